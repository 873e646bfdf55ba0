"""The hand-written mutation list (``tools/mutations.yaml``, ``make mutate``) stays alive: every
mutation's ``find`` text is still in its file (code that moved would leave it stale) and its
tests exist. ``make mutate`` itself runs outside ``make test``."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MUTATIONS = yaml.safe_load((ROOT / "tools" / "mutations.yaml").read_text())


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m["id"] for m in MUTATIONS])
def test_each_mutation_still_applies(mutation):
    text = (ROOT / mutation["file"]).read_text()
    assert mutation["find"] in text, f"{mutation['id']}: its find text is gone from {mutation['file']}"
    assert mutation["find"] != mutation["replace"]
    assert all((ROOT / t).is_file() for t in mutation["tests"]), mutation["tests"]


def test_ids_are_unique():
    ids = [m["id"] for m in MUTATIONS]
    assert len(ids) == len(set(ids)) and len(ids) >= 39
