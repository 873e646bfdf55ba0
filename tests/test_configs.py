"""Every shipped config loads and validates; every sweep file parses."""

from pathlib import Path

import pytest

import sparseham.methods  # noqa: F401  (registers the built-in methods)
from sparseham.analysis.sweep import load_sweep
from sparseham.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUNNABLE = sorted(
    p for p in CONFIGS.rglob("*.yaml") if not p.name.startswith("_") and "studies" not in p.parts
)


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_loads(path):
    cfg = load_config(path)
    assert cfg.sparsity.method


@pytest.mark.parametrize("name", ["rigl", "acdc", "str", "random_pai", "dense"])
def test_every_example_has_a_ham_twin(name):
    plain, ham = load_config(CONFIGS / f"{name}.yaml"), load_config(CONFIGS / f"{name}_ham.yaml")
    assert not plain.ham.enabled and ham.ham.enabled
    assert plain.sparsity.method == ham.sparsity.method


@pytest.mark.parametrize("path", sorted((CONFIGS / "studies").glob("[a-z]*.yaml")), ids=lambda p: p.name)
def test_every_study_cell_is_a_valid_config(path):
    sweep = load_sweep(path)
    assert sweep.cells
    for cell in sweep.cells:
        sets = [f"{k}={'null' if v is None else v}" for k, v in cell.overrides.items()]
        load_config(cell.config, sets)
