"""Damaged or foreign files in run directories (issue 33, items 7 and 8): a ``final.json`` that is
not a finished run's record is not counted as finished, and the same command rewrites it, as the
readers' message says; the readers (report, sweep, study) answer damaged input with one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparseham.analysis import report, sweep
from sparseham.cli import train_main

__all__: list[str] = []

ROOT = Path(__file__).resolve().parents[1]
SETS = ["data.dataset=synthetic", "model.name=lenet300", "data.batch_size=32",
        "data.synthetic.train_size=256", "data.synthetic.test_size=64", "train.max_steps=4",
        "logging.log_every=2", "logging.tensorboard=false", "logging.progress=false", "checkpoint.every=0",
        "tracking.interval=1"]


def _argv(out: Path) -> list[str]:
    return ["--config", "default", "--out", str(out), "--set", *SETS]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("damaged") / "run"
    assert train_main(_argv(out)) == 0
    return out


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def _without_time(final: dict) -> dict:
    return {k: v for k, v in final.items() if k != "wall_time_s"}


DAMAGE = {
    "random bytes": (lambda text: os.urandom(200), "unreadable: "),
    "half a file": (lambda text: text[: len(text) // 2], "unreadable: "),
    "a list": (lambda text: b"[1, 2]", "expected a JSON object, got list"),
    "wrong types": (lambda text: json.dumps({**json.loads(text), "steps": "4"}).encode(),
                    "'steps' is str, expected a whole number"),
    "no finished": (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "finished"})
                    .encode(), 'no "finished": true'),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_final_json_is_rewritten_by_the_same_command(finished, tmp_path, capsys, case):
    damage, problem = DAMAGE[case]
    run = _copy(finished, tmp_path / "run")
    original = json.loads((run / "final.json").read_text())
    (run / "final.json").write_bytes(damage((run / "final.json").read_bytes()))
    if case != "no finished":  # the report's message: what the command below then does
        with pytest.raises(ValueError, match=r"the file is damaged, re-run the same command to rewrite it$"):
            report.write_report([run], tmp_path / "report")
    capsys.readouterr()
    assert train_main(_argv(run)) == 0
    out = capsys.readouterr().out
    assert f"warning: {run / 'final.json'} is damaged ({problem}" in out
    assert "finishing the run again from its last checkpoint to rewrite it" in out
    assert "already finished" not in out
    assert _without_time(json.loads((run / "final.json").read_text())) == _without_time(original)
    assert train_main(_argv(run)) == 0  # now it is finished
    assert "is already finished (final.json exists); nothing to do" in capsys.readouterr().out


def test_a_damaged_final_json_through_the_command_line(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    (run / "final.json").write_bytes(b"\x00\xff" * 100)
    proc = subprocess.run([sys.executable, "-m", "sparseham", "train", *_argv(run)], cwd=ROOT, timeout=300,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert f"warning: {run / 'final.json'} is damaged (unreadable: " in proc.stdout
    assert json.loads((run / "final.json").read_text())["finished"] is True


def test_a_sweep_runs_a_cell_whose_final_json_is_damaged_again(tmp_path, capsys):
    shutil.copy(ROOT / "configs" / "default.yaml", tmp_path / "default.yaml")
    spec = {"config": "default.yaml", "out": str(tmp_path / "out"), "grid": {"experiment.seed": [0, 1]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    for seed, text in ((0, '{"finished": true}'), (1, "\x00 not JSON")):
        (tmp_path / "out" / f"seed={seed}").mkdir(parents=True)
        (tmp_path / "out" / f"seed={seed}" / "final.json").write_text(text)
    assert sweep.main([str(tmp_path / "s.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 cells, 1 to run, 1 skipped" in out and f"--out {tmp_path / 'out' / 'seed=1'}" in out
