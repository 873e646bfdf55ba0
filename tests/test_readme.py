"""The README: its Python snippet runs as written, its evidence table is the study's generated
table, its links resolve, and it stays short. (The evidence pages' tables and the adding-a-method
snippet moved to the docs and are checked in tests/test_docs.py.)"""

import re
from pathlib import Path

import pytest
import torch

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_short_use_snippet_trains():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    scope = {"loader": [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)] * 3}
    exec(SNIPPETS[0], scope)
    mm = scope["mm"]
    assert mm.step_count == 11  # the first iteration is RigL's topology-only update (its reference)
    assert abs(mm.sparsity() - 0.9) < 1e-3
    assert set(mm.tracker.read()) == {"1.weight", "3.weight"}  # the tracker follows both Linear weights


@pytest.mark.compiled
@pytest.mark.slow
def test_short_use_snippet_learns_fashion_mnist_in_one_epoch():
    """Issue 11: the snippet as written (alpha 200, the default trust region) on the real data."""
    from sparseham.data import build_data

    data = build_data("fashion_mnist", root=str(Path(__file__).resolve().parents[1] / "data"), batch_size=128,
                      seed=0)
    torch.manual_seed(0)
    scope = {"loader": data.train.epoch(0)}
    exec(SNIPPETS[0], scope)
    model, mm = scope["model"], scope["mm"]
    correct = seen = 0
    with torch.no_grad():
        for x, y in data.test.epoch(0):
            correct += int((model(x).argmax(1) == y).sum())
            seen += len(y)
    assert seen == 10_000 and correct / seen >= 0.80
    assert abs(mm.sparsity() - 0.9) < 1e-3


def test_the_readme_is_short():
    assert len(README.splitlines()) <= 250


def test_every_relative_link_in_the_readme_resolves():
    root = Path(__file__).resolve().parents[1]
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert len(local) > 10
    assert [link for link in local if not (root / link).exists()] == []


def _study_table(results: str, title: str) -> dict[str, list[str]]:
    block = results.split(f"**{title}**", 1)[1].split("\n\n", 2)[1]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                             for line in block.splitlines()[2:])}


def test_the_readme_evidence_table_is_the_generated_study_table():
    """Each row: the 95% cells (dense: its own column) of the generated tables at the defaults and
    with equal budgets, and the paper's 95% column (dense: 90%) beside them. The generated file
    itself is checked against the CSV in tests/test_docs.py."""
    root = Path(__file__).resolve().parents[1]
    results = (root / "docs/study/results.md").read_text()
    defaults = _study_table(results, "At the defaults: Fashion-MNIST, LeNet-300-100")
    budgets = _study_table(results, "Equal tuning budgets: Fashion-MNIST, LeNet-300-100")
    paper = _study_table(results, "HAM's gain here (at the defaults) beside the paper's")
    assert len(defaults) == 8
    for method, row in defaults.items():
        pick = 0 if method == "dense" else 2
        expected = [row[pick], budgets[method][pick], paper[method][0 if method == "dense" else 1]]
        line = re.search(rf"^\| {re.escape(method)} \|(.*)\|$", README, flags=re.M)
        assert line and [c.strip() for c in line.group(1).split("|")] == expected, method
