"""The README's Python snippets run as written."""

import re
from pathlib import Path

import pytest
import torch

from sparseham import method as registry

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


def test_adding_a_method_snippet_registers_a_working_method():
    saved = dict(registry._REGISTRY)
    try:
        scope = {}
        (snippet,) = [s for s in SNIPPETS if "@register(" in s]
        exec(snippet, scope)
        from sparseham import MaskManager

        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mm = MaskManager(model, opt, registry.get("gmp_fixed")(target=0.75, every=2))
        for _ in range(4):
            model(torch.randn(4, 8)).sum().backward()
            mm.step()
            opt.zero_grad()
        mm.verify()
        assert abs(mm.sparsity() - 0.75) < 0.01
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)


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


def _cells(path):
    import csv

    return list(csv.DictReader((Path(__file__).resolve().parents[1] / path).open()))


def _signed(value: float) -> str:
    return f"{value:+.2f}".replace("-", "−")


def test_the_clamp_study_numbers_in_the_readme_are_the_csvs():
    import collections
    import statistics

    from sparseham.analysis.clamp_study import _gains, against, load

    base, grid = load(Path(__file__).resolve().parents[1] / "docs/study/ham_clamp/cells.csv")
    names = {"lenet300": "LeNet-300", "lenet5": "LeNet-5"}
    for pair in ((200.0, 0.02), (50.0, 5.0)):
        by = collections.defaultdict(list)
        for cell, seed, gain in _gains(base, grid, pair):
            by[(cell[0], seed)].append(100 * gain)
        for (model, seed), gains in by.items():
            row = re.search(rf"^ *\| {names[model]}, seed {seed} \|(.*)\|$", README, flags=re.M)
            cols = [c.strip() for c in row.group(1).split("|")]
            collapses, mean = str(sum(g < -5 for g in gains)), _signed(statistics.mean(gains))
            if pair == (200.0, 0.02):
                assert cols[0] == str(len(gains)) and [cols[1], cols[2], cols[3]] == [
                    collapses, mean, _signed(min(gains))], (model, seed)
            else:
                assert [cols[5], cols[4]] == [collapses, mean], (model, seed)
    names = {"dense": "dense", "static": "random PaI", "rigl": "RigL", "acdc": "AC/DC", "str": "STR"}
    prose = " ".join(README.split())  # the sentence wraps across lines
    for r in against(base, grid):
        assert f"{names[r['method']]} {_signed(r['new_gain'])} against {_signed(r['old_gain'])}" in prose


def test_the_resnet20_and_str_tables_in_the_readme_are_the_csvs():
    rows = {(r["method"], r["ham"], r["clamp"], r["seed"]): 100 * float(r["test_acc"])
            for r in _cells("docs/study/ham_resnet20/cells.csv")}
    for method, name in (("dense", "dense"), ("static", "random PaI 90%"), ("rigl", "RigL 90%")):
        plain = " / ".join(f"{rows[(method, 'False', '0.02', s)]:.2f}" for s in "01")
        ham = " / ".join(f"{rows[(method, 'True', '0.02', s)]:.2f}" for s in "01")
        assert re.search(rf"^ *\| {name} \| {plain} \| {ham} \|", README, flags=re.M), name
    assert " / ".join(f"{rows[('rigl', 'True', '5.0', s)]:.2f}" for s in "01") in README
    for r in _cells("docs/study/str_projection/cells.csv"):
        assert float(r["sparsity"]) == pytest.approx(float(r["target"]), abs=1e-4)  # exact targets


def test_the_readme_study_tables_are_the_committed_csvs(tmp_path):
    """The README's study tables are exactly what `sparseham study table docs/study/cells.csv`
    generates from the committed rows (and the tuning and tuned CSVs beside them)."""
    from sparseham.analysis.study_report import BEGIN, END, readme_block, write

    root = Path(__file__).resolve().parents[1]
    generated = readme_block(write(root / "docs/study/cells.csv", tmp_path).read_text())
    block = README.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")
    assert block == generated
    assert "| RigL |" in block and "Equal tuning budgets" in block
