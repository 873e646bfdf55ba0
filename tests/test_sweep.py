"""Tests for analysis.sweep: parsing, grid expansion, naming, skipping, running, aggregation."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import _rundirs
import pytest
import yaml

from sparseham.analysis import cells, results, runs, sweep
from sparseham.analysis.sweep import SweepError

__all__: list[str] = []

TESTS = Path(__file__).resolve().parent
GRID = {"sparsity.method": ["static", "rigl"], "ham.enabled": [False, True],
        "experiment.seed": [0, 1, 2]}

# Stands in for train.py: writes a realistic run directory, or fails for method "bad".
FAKE_TRAIN = f"""
import json, sys
sys.path.insert(0, {str(TESTS)!r})
import _rundirs
out, overrides = sys.argv[1], json.loads(sys.argv[2])
if overrides["sparsity.method"] == "bad":
    sys.exit("boom: unknown method")
seed = overrides["experiment.seed"]
_rundirs.write_run(out, method=overrides["sparsity.method"], ham=overrides["ham.enabled"],
                   seed=seed, records=2, test_acc=0.80 + 0.02 * seed,
                   extra={{"train.max_steps": overrides["train.max_steps"]}})
"""


def _fake_train(cell: sweep.Cell) -> list[str]:
    return [sys.executable, "-c", FAKE_TRAIN, str(cell.run_dir), json.dumps(cell.overrides)]


def _write_sweep(tmp_path: Path, grid=None, **spec) -> Path:
    (tmp_path / "configs").mkdir(exist_ok=True)
    (tmp_path / "configs" / "default.yaml").write_text(yaml.safe_dump(_rundirs.config()))
    body = {"config": "default.yaml", "out": str(tmp_path / "out"),
            "set": {"train.max_steps": 200}, "grid": GRID if grid is None else grid, **spec}
    path = tmp_path / "configs" / "sweep.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def test_grid_expansion_and_names(tmp_path):
    spec = sweep.load_sweep(_write_sweep(tmp_path))
    assert len(spec.cells) == 12
    assert [c.name for c in spec.cells[:4]] == [
        "method=static_enabled=false_seed=0", "method=static_enabled=false_seed=1",
        "method=static_enabled=false_seed=2", "method=static_enabled=true_seed=0"]
    assert len({c.name for c in spec.cells}) == 12
    cell = spec.cells[-1]
    assert cell.run_dir == tmp_path / "out" / "method=rigl_enabled=true_seed=2"
    assert cell.log == tmp_path / "out" / "logs" / "method=rigl_enabled=true_seed=2.log"
    assert cell.config == tmp_path / "configs" / "default.yaml"
    assert sweep.train_command(cell) == [
        sys.executable, "-m", "sparseham", "train", "--config", str(cell.config),
        "--set", "train.max_steps=200", "--set", "sparsity.method=rigl",
        "--set", "ham.enabled=true", "--set", "experiment.seed=2", "--out", str(cell.run_dir)]


def test_union_of_grids_drops_duplicates():
    cells = sweep.expand([{"a.x": [1, 2], "b.y": ["p"]}, {"a.x": [2, 3], "b.y": ["p"]}])
    assert cells == [{"a.x": 1, "b.y": "p"}, {"a.x": 2, "b.y": "p"}, {"a.x": 3, "b.y": "p"}]
    assert sweep.cell_names(cells) == ["x=1", "x=2", "x=3"]


def test_names_are_safe_and_unique():
    cells = [{"model.name": "torchvision:resnet18", "optim.name": "sgd"},
             {"model.name": "torchvision/resnet18", "optim.name": "sgd"},
             {"model.name": "Torchvision:resnet18", "optim.name": "adam"},
             {"model.name": "lenet5", "optim.name": "adam", "ham.alpha": 1e-3}]
    names = sweep.cell_names(cells)
    assert names == ["model.name=torchvision-resnet18_optim.name=sgd",
                     "model.name=torchvision-resnet18_optim.name=sgd-2",
                     "model.name=Torchvision-resnet18_optim.name=adam",
                     "model.name=lenet5_optim.name=adam_alpha=0.001"]
    assert sweep.cell_names([{"a.b": 1}]) == ["run"]
    upper = sweep.cell_names([{"m.k": "A"}, {"m.k": "a"}])
    assert upper == ["k=A", "k=a-2"]  # case-insensitive file systems would merge them


@pytest.mark.parametrize("value", ["rigl", "true", "1", "torchvision:resnet18", "a: b", True,
                                   None, 0.001, 1e-5, 2e20, 200.0, 3, [1, 2]])
def test_set_values_read_back_by_yaml(value):
    # train.py parses each --set value with yaml.safe_load.
    assert yaml.safe_load(runs.value_text(value)) == value


@pytest.mark.parametrize("text, message", [
    ("config: default.yaml\nout: o\n", "missing key 'grid'"),
    ("out: o\ngrid: {a.b: [1]}\n", "missing key 'config'"),
    ("config: default.yaml\nout: o\ngrid: {a.b: 1}\n", "grid value of 'a.b' must be a non-empty list"),
    ("config: default.yaml\nout: o\ngrid: [{a.b: [1]}, 3]\n", "'grid' must map dotted keys"),
    ("config: default.yaml\nout: o\ngird: {a.b: [1]}\n", "unknown key 'gird'"),
    ("config: default.yaml\nout: o\ngrid: {a.b: [1]\n", "cannot read the sweep file"),
    ("config: nope.yaml\nout: o\ngrid: {a.b: [1]}\n", "config 'nope.yaml' not found"),
    ("- just\n- a list\n", "expected a mapping of config, out, grid"),
])
def test_bad_sweep_file(tmp_path, capsys, text, message):
    (tmp_path / "default.yaml").write_text("{}\n")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SweepError, match=message):
        sweep.load_sweep(path)
    assert sweep.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and str(path) in err


def test_bad_sweep_file_cli_has_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("config: x.yaml\nout: o\n")
    proc = subprocess.run([sys.executable, "-m", "sparseham", "sweep", str(path), "--dry-run"],
                          cwd=TESTS.parent, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"sparseham sweep: {path}: missing key 'grid' (required: " \
                                  "config, out, grid)"


def test_finished_cells_are_skipped(tmp_path, capsys):
    path = _write_sweep(tmp_path)
    cells = sweep.load_sweep(path).cells
    for cell in cells:
        cell.run_dir.mkdir(parents=True)
        (cell.run_dir / "final.json").write_text('{"finished": true}')
    assert sweep.run_sweep(path, dry_run=True) == 0
    assert "12 cells, 0 to run, 12 skipped" in capsys.readouterr().out
    todo, done = sweep.plan(sweep.load_sweep(path))
    assert todo == [] and len(done) == 12
    (cells[4].run_dir / "final.json").unlink()
    assert sweep.main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "12 cells, 1 to run, 11 skipped" in out
    assert f"--out {cells[4].run_dir}" in out and "-m sparseham train" in out
    assert out.count("--out") == 1


def test_sweep_runs_real_subprocesses_and_aggregates(tmp_path, capsys):
    grid = [{"sparsity.method": ["rigl"], "ham.enabled": [False, True],
             "experiment.seed": [0, 1, 2]},
            {"sparsity.method": ["bad"], "ham.enabled": [False], "experiment.seed": [0]}]
    path = _write_sweep(tmp_path, grid=grid)
    assert sweep.run_sweep(path, jobs=2, command=_fake_train) == 1
    out = capsys.readouterr().out
    bad = sweep.load_sweep(path).cells[-1]
    assert bad.name == "method=bad_enabled=false_seed=0"
    assert f"{bad.name}: FAILED with exit code 1, log: {bad.log}" in out
    assert "boom: unknown method" in bad.log.read_text()
    assert out.count(": ok") == 6

    assert sweep.run_sweep(path, command=_fake_train) == 1
    assert "7 cells, 1 to run, 6 skipped" in capsys.readouterr().out

    with (tmp_path / "out" / "results.csv").open() as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"ham.enabled=false", "ham.enabled=true"}
    for name in ("ham.enabled=false", "ham.enabled=true"):
        run_name = name.removeprefix("ham.")  # run directories keep the short, stable names
        finals = [json.loads((tmp_path / "out" / f"method=rigl_{run_name}_seed={s}" / "final.json")
                             .read_text()) for s in range(3)]
        row = rows[name]
        assert row["n"] == "3"
        assert float(row["test_acc_mean"]) == pytest.approx(0.82)
        assert float(row["test_acc_std"]) == pytest.approx(0.02)
        flips = [f["flips_masked"] + f["flips_unmasked"] for f in finals]
        assert float(row["total_flips_mean"]) == pytest.approx(statistics.mean(flips))
        assert float(row["total_flips_std"]) == pytest.approx(statistics.stdev(flips))
        ever = [f["ever_flipped_frac"] for f in finals]
        assert float(row["ever_flipped_frac_std"]) == pytest.approx(statistics.stdev(ever))
        assert float(row["val_acc_mean"]) == pytest.approx(0.815)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| ham.enabled=true | 3 | 0.8200 ± 0.0200 | 0.8150 ± 0.0200 | 0.9000 ± 0.0000 |" in md


def test_aggregate_without_val_acc(tmp_path):
    for seed in (0, 1):
        run = _rundirs.write_run(tmp_path / f"s{seed}", seed=seed, records=2)
        final = json.loads((run / "final.json").read_text())
        (run / "final.json").write_text(json.dumps({**final, "val_acc": None}))
    md, table = results.aggregate(tmp_path)
    assert "val_acc" not in md.read_text() and "val_acc" not in table.read_text()
    assert "| all seeds | 2 |" in md.read_text()


def _write_valid_sweep(tmp_path: Path, grid: dict) -> Path:
    """A sweep over the shipped default config (the ledger resolves each cell's config)."""
    path = _write_sweep(tmp_path, grid=grid)
    shutil.copy(TESTS.parent / "configs" / "default.yaml", tmp_path / "configs" / "default.yaml")
    return path


def test_csv_ledger_survives_a_new_machine(tmp_path, capsys):
    grid = {"sparsity.method": ["rigl"], "ham.enabled": [False, True], "experiment.seed": [0, 1]}
    path = _write_valid_sweep(tmp_path, grid)
    ledger = tmp_path / "docs" / "cells.csv"
    assert sweep.run_sweep(path, command=_fake_train, csv_path=ledger) == 0
    rows = cells.read_rows(ledger)
    assert sorted(r["cell"] for r in rows) == sorted(c.name for c in sweep.load_sweep(path).cells)
    assert len({r["hash"] for r in rows}) == 4  # the seed is part of the config hash
    first = next(r for r in rows if r["cell"] == "enabled=true_seed=1")
    assert (first["method"], first["ham"], first["seed"]) == ("rigl", "True", "1")
    final = json.loads((tmp_path / "out" / "enabled=true_seed=1" / "final.json").read_text())
    assert float(first["test_acc"]) == final["test_acc"] == pytest.approx(0.82)
    capsys.readouterr()

    shutil.rmtree(tmp_path / "out")  # a new machine: runs/ is gone, the committed CSV is not
    assert sweep.run_sweep(path, command=_fake_train, csv_path=ledger) == 0
    assert "4 cells, 0 to run, 4 skipped" in capsys.readouterr().out
    assert not (tmp_path / "out" / "enabled=true_seed=1").exists()
    # Newer code or config keys change the resolved config, not the cells: still nothing to run.
    base = tmp_path / "configs" / "default.yaml"
    config = yaml.safe_load(base.read_text())
    base.write_text(yaml.safe_dump({**config, "tracking": {**config["tracking"], "interval": 2}}))
    assert sweep.run_sweep(path, command=_fake_train, csv_path=ledger) == 0
    assert "4 cells, 0 to run, 4 skipped" in capsys.readouterr().out

    grid["experiment.seed"] = [0, 1, 2]  # a grown grid runs only its new cells
    path = _write_valid_sweep(tmp_path, grid)
    assert sweep.run_sweep(path, command=_fake_train, csv_path=ledger) == 0
    assert "6 cells, 2 to run, 4 skipped" in capsys.readouterr().out
    assert len(cells.read_rows(ledger)) == 6


def test_cells_missing_from_the_csv_are_recorded_from_their_run_dirs(tmp_path, capsys):
    path = _write_valid_sweep(tmp_path, {"sparsity.method": ["rigl"], "ham.enabled": [True],
                                         "experiment.seed": [0, 1]})
    assert sweep.run_sweep(path, command=_fake_train) == 0
    ledger = tmp_path / "cells.csv"
    assert sweep.run_sweep(path, command=_fake_train, csv_path=ledger) == 0
    assert "2 cells, 0 to run, 2 skipped" in capsys.readouterr().out
    assert [r["seed"] for r in cells.read_rows(ledger)] == ["0", "1"]
