"""train.py end to end: the run directory, resume after SIGTERM, DDP, AMP, and re-runs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from sparseham.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SYNTH = ["data.dataset=synthetic", "model.name=lenet300", "data.batch_size=64", "logging.log_every=10",
         "optim.lr=0.05", "ham.alpha=20", "checkpoint.every=20"]


def train(out, *sets, config="configs/default.yaml", check=True, extra=(), timeout=300):
    cmd = [sys.executable, "train.py", "--config", config, "--out", str(out), *extra]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.compiled
def test_default_config_smoke_run_writes_every_file(tmp_path):
    out = tmp_path / "run"
    proc = train(out, "train.max_steps=30", "logging.log_every=10", "logging.histograms_every=15")
    assert "step 30/30" in proc.stdout and "ETA" in proc.stdout
    for name in ("config.yaml", "metrics.jsonl", "signflips.jsonl", "final.json", "checkpoint.pt"):
        assert (out / name).is_file(), name
    assert list(out.glob("events.out.tfevents.*"))
    final = json.loads((out / "final.json").read_text())
    for key in ("test_acc", "test_loss", "sparsity", "steps", "wall_time_s", "layers"):
        assert key in final
    assert final["steps"] == 30 and final["method"] == "rigl" and final["ham"]["enabled"]
    assert final["sparsity"] == pytest.approx(0.95, abs=1e-5)
    layer = final["layers"]["conv1.weight"]
    assert set(layer) == {"shape", "numel", "sparsity", "flips_masked", "flips_unmasked"}
    state = load_checkpoint(out / "checkpoint.pt")
    assert set(state["model"]) >= {"conv1.weight", "fc2.bias"}
    events = {e["event"] for e in _jsonl(out / "metrics.jsonl")}
    assert {"start", "train", "eval", "mask", "end"} <= events
    flips = _jsonl(out / "signflips.jsonl")
    assert [r["step"] for r in flips] == [10, 20, 30]
    totals = sum(r["layers"][n]["unmasked"] for r in flips for n in r["layers"])
    assert totals == final["flips_unmasked"]
    assert yaml.safe_load((out / "config.yaml").read_text())["sparsity"]["method"] == "rigl"


def test_checkpoint_file_loads_with_torch_load(tmp_path):
    """DESIGN's contract: torch.load(RUN/checkpoint.pt)["model"] is the model's state_dict."""
    out = tmp_path / "run"
    train(out, *SYNTH, "train.max_steps=5")
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert "fc1.weight" in state["model"]


def test_sigterm_then_resume_is_bit_identical(tmp_path):
    sets = [*SYNTH, "train.max_steps=120", "sparsity.rigl.update_every=15"]
    train(tmp_path / "straight", *sets)
    out = tmp_path / "stopped"
    cmd = [sys.executable, "train.py", "--config", "configs/default.yaml", "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        if sum('"event":"train"' in line for line in lines) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stdout
    assert "re-run the same command to resume" in stdout
    stopped_at = load_checkpoint(out / "checkpoint.pt")["step"]
    assert 30 <= stopped_at < 120
    resumed = train(out, *sets)
    assert f"resumed from {out / 'checkpoint.pt'} at step {stopped_at}" in resumed.stdout
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(out / "checkpoint.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    fa, fb = (json.loads((d / "final.json").read_text()) for d in (tmp_path / "straight", out))
    assert fa["test_acc"] == fb["test_acc"] and fa["flips_unmasked"] == fb["flips_unmasked"]
    steps = [r["step"] for r in _jsonl(out / "signflips.jsonl")]
    assert steps == sorted(set(steps))  # the resumed run rewrote, not duplicated, its records


def test_nonfinite_check_ignore_trains(tmp_path):
    out = tmp_path / "run"
    train(out, *SYNTH, "train.max_steps=5", "train.on_nonfinite=ignore")
    assert json.loads((out / "final.json").read_text())["steps"] == 5


def test_finished_run_rerun_says_so(tmp_path):
    out = tmp_path / "run"
    train(out, *SYNTH, "train.max_steps=5")
    again = train(out, *SYNTH, "train.max_steps=5")
    assert "already finished" in again.stdout


def test_bf16_autocast_on_cpu(tmp_path):
    results = {}
    for amp in ("none", "bf16"):
        train(tmp_path / amp, *SYNTH, "train.max_steps=40", f"train.amp={amp}", "sparsity.target=0.5")
        results[amp] = json.loads((tmp_path / amp / "final.json").read_text())
    assert results["bf16"]["test_acc"] > 0.3  # chance is 0.1; float32 gets the same ballpark
    assert abs(results["bf16"]["test_acc"] - results["none"]["test_acc"]) < 0.15
    assert results["bf16"]["sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert results["bf16"]["test_loss"] != results["none"]["test_loss"]  # autocast really ran


def test_print_config_and_errors(tmp_path):
    proc = train(tmp_path / "x", "ham.alpha=7", extra=["--print-config"])
    assert yaml.safe_load(proc.stdout)["ham"]["alpha"] == 7.0
    bad = train(tmp_path / "x", "ham.alpah=7", check=False)
    assert bad.returncode == 2 and "did you mean 'ham.alpha'" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    missing = train(tmp_path / "x", config="configs/nope.yaml", check=False)
    assert missing.returncode == 2 and "config file not found" in missing.stderr


def test_different_config_in_out_dir_is_refused_unless_forced(tmp_path):
    out = tmp_path / "run"
    train(out, *SYNTH, "train.max_steps=5")
    clash = train(out, *SYNTH, "train.max_steps=5", "optim.lr=0.2", check=False)
    assert clash.returncode == 2 and "optim.lr" in clash.stderr and "--force" in clash.stderr
    train(out, *SYNTH, "train.max_steps=5", "optim.lr=0.2", extra=["--force"])
    assert json.loads((out / "final.json").read_text())["lr"] == 0.2
    assert len(list(tmp_path.glob("run.replaced-*"))) == 1  # the old run was moved aside, not lost


@pytest.mark.slow
@pytest.mark.parametrize("sam", [[], ["optim.sam.rho=0.05"]], ids=["sgd", "sam"])
def test_ddp_two_gloo_processes_agree(tmp_path, sam):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    out = tmp_path / "ddp"
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "train.py", "--config", "configs/default.yaml",
           "--out", str(out)]
    sets = [*SYNTH, "train.max_steps=40", "sparsity.rigl.update_every=10", "tracking.per_weight=true", *sam]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    final = json.loads((out / "final.json").read_text())
    assert final["world_size"] == 2
    digests = final["rank_digests"]
    assert len(digests) == 2 and len(set(digests)) == 1  # masks, weights, HAM state and tracker
    assert len([e for e in _jsonl(out / "metrics.jsonl") if e["event"] == "start"]) == 1
    # Rank against a single process of the same config (each rank had half of every batch):
    # the same masks, weights to float tolerance (the gradient all-reduce sums in another
    # order), the same flip counts.
    single = tmp_path / "single"
    train(single, *sets)
    one, two = (load_checkpoint(d / "checkpoint.pt") for d in (single, out))
    for a, b in zip(one["manager"]["masks"], two["manager"]["masks"], strict=True):
        assert torch.equal(a, b)
    for name, weight in one["model"].items():
        assert torch.allclose(weight, two["model"][name], rtol=1e-4, atol=1e-5), name
    solo = json.loads((single / "final.json").read_text())
    for key in ("flips_masked", "flips_unmasked", "sparsity"):
        assert final[key] == pytest.approx(solo[key], rel=1e-3, abs=2), key
