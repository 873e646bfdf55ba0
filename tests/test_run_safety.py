"""Reliability, round two (issue 18), as real processes: the run-directory lock, resume checks what
it resumes, history survives a failing resume, empty splits, and what a failed set-up leaves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETS = ["data.dataset=synthetic", "model.name=lenet300", "data.batch_size=32",
        "data.synthetic.train_size=512", "data.synthetic.test_size=128", "logging.tensorboard=false",
        "checkpoint.every=10", "logging.log_every=5"]


def _cmd(out: Path, *sets: str, config: str = "default") -> list[str]:
    return [sys.executable, "-m", "sparseham", "train", "--config", config, "--out", str(out),
            "--set", *SETS, *sets]


def _run(out: Path, *sets: str, config: str = "default", **kw) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(out, *sets, config=config), cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kw)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.05)


def test_a_second_process_on_the_same_run_dir_exits_2_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(_cmd(out, "train.max_steps=100000", "experiment.seed=1"), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / "metrics.jsonl")  # the first run holds the lock and is training
        second = _run(out, "train.max_steps=100000", "experiment.seed=2")
        assert second.returncode == 2
        assert second.stderr.strip() == (f"error: {out} is in use by another training process (PID "
                                         f"{first.pid}); wait for it to finish, or choose another --out")
    finally:
        first.send_signal(signal.SIGTERM)  # stops at the end of its step, with a checkpoint
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM
    config = (out / "config.yaml").read_text()
    assert "seed: 1" in config and "seed: 2" not in config
    steps = [r["step"] for r in _records(out / "metrics.jsonl") if r["event"] == "train"]
    assert steps == list(range(5, 5 * len(steps) + 1, 5))  # one run's records, not two interleaved


def test_a_lock_left_by_a_killed_process_never_blocks(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(_cmd(out, "train.max_steps=400"), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    _wait_for(out / "checkpoint.pt")
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (out / ".lock").read_text().strip() == str(first.pid)  # the file stays, the lock does not
    again = _run(out, "train.max_steps=400")
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout


def test_resume_refuses_a_changed_config_even_without_config_yaml(tmp_path):
    out = tmp_path / "run"
    stopped = _run(out, "train.max_steps=40", "train.on_nonfinite=stop", "optim.lr=0.05")
    assert stopped.returncode == 0
    (out / "final.json").unlink()
    (out / "config.yaml").unlink()  # nothing left to compare but the checkpoint's own config
    changed = _run(out, "train.max_steps=40", "optim.lr=0.5")
    assert changed.returncode == 2
    assert changed.stderr.startswith(f"error: {out / 'checkpoint.pt'} was saved by a run with another config "
                                     "(optim.lr: 0.05 there, 0.5 now); only the same run resumes")
    assert len(changed.stderr.strip().splitlines()) == 1 and "Traceback" not in changed.stderr
    longer = _run(out, "train.max_steps=60", "optim.lr=0.05")  # extending a run is allowed
    assert longer.returncode == 0, longer.stderr
    assert "resumed from" in longer.stdout and json.loads((out / "final.json").read_text())["steps"] == 60


@pytest.mark.parametrize("other", ["str", "acdc"])
def test_resume_from_another_configs_checkpoint_is_refused(tmp_path, other):
    donor = tmp_path / "donor"
    assert _run(donor, "train.max_steps=20", config=other).returncode == 0
    out = tmp_path / "run"
    proc = _run(out, "train.max_steps=20", f"checkpoint.resume={donor / 'checkpoint.pt'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: {donor / 'checkpoint.pt'} was saved by a run with another "
                                  "config (")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (out / "final.json").exists()


def test_a_resume_that_cannot_write_keeps_the_whole_history(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(_cmd(out, "train.max_steps=400"), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    _wait_for(out / "checkpoint-20.pt")
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = {name: (out / name).read_text() for name in ("metrics.jsonl", "signflips.jsonl")}
    limit = min(len(text) for text in before.values()) // 2  # rewriting either file must fail

    def small_files():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    proc = _run(out, "train.max_steps=400", preexec_fn=small_files)
    assert proc.returncode == 1 and "File too large" in proc.stderr
    for name, text in before.items():  # the resume's truncation failed: nothing was lost
        assert (out / name).read_text() == text, name


def test_an_empty_test_split_stops_before_training_and_creates_nothing(tmp_path):
    out = tmp_path / "run"
    proc = _run(out, "data.synthetic.test_size=0")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "test" in proc.stderr
    assert not out.exists()  # the directory this call created is gone again


def test_a_checkpoint_from_beyond_the_run_is_refused(tmp_path):
    from sparseham.train.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path / "run"
    assert _run(out, "train.max_steps=20").returncode == 0
    state = load_checkpoint(out / "checkpoint.pt")
    for step in (-5, 10**6):
        state = {k: v for k, v in state.items() if k != "sha256"} | {"step": step}
        (tmp_path / f"forged{step}").mkdir()
        forged = save_checkpoint(state, tmp_path / f"forged{step}")  # a well-formed file, checksum and all
        proc = _run(tmp_path / f"new{step}", "train.max_steps=20", f"checkpoint.resume={forged}")
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == (f"error: {forged}: step {step} is outside this run's 0..20 steps; the "
                                       "checkpoint is not this run's")
    assert os.path.exists(out / "final.json")
