"""FSDP2 (``train.distributed: fsdp``): two gloo processes on CPU against one process.

Each rank holds half of every weight's rows (DTensor ``Shard(0)``, uneven where the rows are odd)
and half of every batch; one process sees the whole batch. Masks must be identical, weights equal
to float tolerance (the gradient reduction sums in another order), and the sign-flip and HAM
counters identical. Resuming from a checkpoint of full state dicts must be exact.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparseham.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))
# RigL (reference update every 10 steps) + HAM at alpha 200 with the norm cap and diagnostics on
# every step, per-weight flip histograms, a checkpoint half way.
SETS = ["data.dataset=synthetic", "model.name=lenet300", "data.batch_size=64", "logging.log_every=10",
        "optim.lr=0.05", "ham.alpha=200", "ham.max_norm=1.0", "ham.diagnostics=1", "checkpoint.every=20",
        "train.max_steps=40", "sparsity.rigl.update_every=10", "tracking.per_weight=true",
        "logging.progress=false"]


def _train(out: Path, *sets: str, procs: int = 1) -> dict:
    launcher = [TORCHRUN, "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else [sys.executable]
    cmd = [*launcher, "train.py", "--config", "configs/default.yaml", "--out", str(out)]
    for s in (*SETS, *sets):
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "final.json").read_text())


def _assert_same_run(one: Path, two: Path, exact: bool) -> None:
    a, b = (load_checkpoint(d / "checkpoint.pt") for d in (one, two))
    for x, y in zip(a["manager"]["masks"], b["manager"]["masks"], strict=True):
        assert torch.equal(x, y)
    for name, weight in a["model"].items():
        other = b["model"][name]
        same = torch.equal(weight, other) if exact else torch.allclose(weight, other, rtol=1e-5, atol=1e-6)
        assert same, name
    ta, tb = a["manager"]["tracker"], b["manager"]["tracker"]
    assert all(torch.equal(x, y) for x, y in zip(ta["codes"], tb["codes"]))
    assert all(torch.equal(x, y) for x, y in zip(ta["counts"], tb["counts"]))


@pytest.mark.slow
def test_sharded_topk_equals_one_process():
    """Exact k, ties to the lower flat index, NaNs last, an empty shard, global and N:M masks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "tests/_sharded_topk.py"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.count("ok") == 2, proc.stdout + proc.stderr[-3000:]


@pytest.mark.slow
def test_fsdp_two_gloo_processes_match_one_process_and_resume_exactly(tmp_path):
    fsdp = _train(tmp_path / "fsdp", "train.distributed=fsdp", procs=2)
    single = _train(tmp_path / "single")
    assert fsdp["world_size"] == 2 and fsdp["rank_digests"] is None  # shards differ by design
    _assert_same_run(tmp_path / "single", tmp_path / "fsdp", exact=False)
    for key in ("sparsity", "flips_masked", "flips_unmasked", "ever_flipped_frac", "test_acc"):
        assert fsdp[key] == single[key], key
    assert fsdp["ham"] == single["ham"] and fsdp["ham"]["capped"] > 0  # the cap's norms are whole-tensor
    assert fsdp["sparsity"] == 0.95  # exact counts (verified at every log interval as well)
    layers = {n: (v["shape"], v["sparsity"]) for n, v in fsdp["layers"].items()}
    assert layers == {n: (v["shape"], v["sparsity"]) for n, v in single["layers"].items()}
    # Resume half way from the full state dicts of step 20: the same run, bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp", resumed)
    for name in ("final.json", "checkpoint-40.pt", "checkpoint.pt"):
        (resumed / name).unlink()
    shutil.copy(resumed / "checkpoint-20.pt", resumed / "checkpoint.pt")
    again = _train(resumed, "train.distributed=fsdp", procs=2)
    _assert_same_run(tmp_path / "fsdp", resumed, exact=True)
    assert again["test_acc"] == fsdp["test_acc"]


@pytest.mark.parametrize("sets,reason", [
    (["sparsity.method=str"], "STR reparameterizes the weights"),
    (["sparsity.method=static", "sparsity.init=snip"], "snip scores a copy of the whole model"),
    (["sparsity.pattern=2:4", "sparsity.target=0.5"], "rigl under a pattern swaps weights"),
])
def test_fsdp_refuses_what_it_cannot_shard_in_one_line(tmp_path, sets, reason):
    cmd = [sys.executable, "train.py", "--config", "configs/default.yaml", "--out", str(tmp_path / "r"),
           "--set", "train.distributed=fsdp"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and reason in proc.stderr and "or use ddp" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
