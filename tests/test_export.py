"""``sparseham export``: every format round-trips, for runs of every method; dense exports load into
a fresh model with no sparseham import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparseham.config import load_config
from sparseham.export import ExportError, export_run, load_sparse
from sparseham.models import build_model
from sparseham.train import run

ROOT = Path(__file__).resolve().parents[1]
SETS = ["data.dataset=synthetic", "model.name=lenet5", "data.batch_size=64", "train.max_steps=24",
        "logging.log_every=8", "logging.tensorboard=false", "logging.progress=false", "checkpoint.every=0",
        "sparsity.rigl.update_every=8", "sparsity.set.update_every=8", "sparsity.gmp.every=4"]
CONFIGS = ["dense", "random_pai", "rigl", "set", "acdc", "str", "gmp"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    for name in CONFIGS:
        assert run(load_config(f"configs/{name}.yaml", SETS), root / name) == 0
    return root


def _logits(state: dict, batch: torch.Tensor) -> torch.Tensor:
    model = build_model("lenet5", num_classes=10, in_channels=1, image_size=16)
    model.load_state_dict(state, strict=True)
    return model.eval()(batch)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_format_round_trips(runs, tmp_path, name):
    from sparseham.train.checkpoint import load_checkpoint

    batch = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    saved = load_checkpoint(runs / name / "checkpoint.pt")
    dense = tmp_path / "dense.pt"
    stats = export_run(runs / name, dense, "dense")
    assert stats["ratio"] == pytest.approx(1.0, rel=0.01)
    state = torch.load(dense, weights_only=True)
    # The final checkpoint is the trained model itself: the same logits, bit for bit.
    trained = build_model("lenet5", num_classes=10, in_channels=1, image_size=16)
    trained.load_state_dict(saved["model"])
    assert torch.equal(_logits(state, batch), trained.eval()(batch))
    export_run(runs / name, tmp_path / "m.pt", "masks")
    masks = torch.load(tmp_path / "m.pt", weights_only=True)
    assert set(masks) == set(saved["manager"]["names"])
    for key, mask in masks.items():  # pruned weights are 0 (a kept one may be 0 too: just grown)
        assert mask.dtype == torch.bool and mask.shape == state[key].shape
        assert torch.all(state[key][~mask] == 0)
    sparse = tmp_path / "sparse.pt"
    stats = export_run(runs / name, sparse, "sparse")
    restored = load_sparse(sparse)
    torch.testing.assert_close(_logits(restored, batch), _logits(state, batch))
    if name != "dense":
        assert stats["ratio"] > 1.5  # 90% zeros: a sparse layout is smaller


def test_a_dense_export_loads_without_sparseham(runs, tmp_path):
    out = tmp_path / "rigl.pt"
    export_run(runs / "rigl", out, "dense")
    code = ("import sys, torch; sys.modules['sparseham'] = None; "  # any sparseham import fails
            f"s = torch.load({str(out)!r}, weights_only=True); "
            "print(sorted(s) == sorted(k for k in s), all(isinstance(v, torch.Tensor) for v in s.values()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.split() == ["True", "True"], proc.stderr


def test_export_errors_are_one_line(runs, tmp_path):
    for args, expected in [
        ([str(tmp_path), "--out", str(tmp_path / "x.pt")],
         f"{tmp_path} is not a run directory (no config.yaml)"),
        ([str(runs / "rigl"), "--out", str(tmp_path / "x.pt"), "--format", "onnx"],
         "unknown format 'onnx'; choose one of dense, masks, sparse"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "sparseham", "export", *args], capture_output=True,
                              text=True, cwd=ROOT)
        assert proc.returncode == 2 and proc.stderr.strip() == f"sparseham export: {expected}"
    with pytest.raises(ExportError, match="cannot write"):
        export_run(runs / "rigl", Path("/proc/nope/x.pt"), "dense")
    argv = [sys.executable, "-m", "sparseham", "export", str(runs / "rigl"), "--out", str(tmp_path / "r.pt"),
            "--format", "sparse"]
    ok = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and "smaller than the dense export" in ok.stdout
