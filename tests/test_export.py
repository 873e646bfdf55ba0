"""``sparseham export``: every format round-trips, for runs of every method; dense exports load into
a fresh model with no sparseham import."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
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
    out = tmp_path / "str.pt"
    export_run(runs / "str", out, "dense")  # STR: its latent weights and thresholds must be gone
    code = ("import json, sys, torch; sys.modules['sparseham'] = None; "  # any sparseham import fails
            f"s = torch.load({str(out)!r}, weights_only=True); "
            "print(json.dumps({k: [type(v).__name__, list(v.shape), str(v.dtype)] for k, v in s.items()}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    fresh = build_model("lenet5", num_classes=10, in_channels=1, image_size=16).state_dict()
    assert json.loads(proc.stdout) == {k: ["Tensor", list(v.shape), str(v.dtype)] for k, v in fresh.items()}


def test_export_errors_are_one_line(runs, tmp_path):
    for args, expected in [
        ([str(tmp_path), "--out", str(tmp_path / "x.pt")],
         f"{tmp_path} is not a run directory (no config.yaml)"),
        ([str(runs / "rigl"), "--out", str(tmp_path / "x.pt"), "--format", "onnx"],
         "unknown format 'onnx'; choose one of dense, masks, sparse, hf"),
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


def _export(*args, cwd: Path = ROOT, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparseham", "export", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, **kw)


def _files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


@pytest.mark.parametrize(("out", "message"), [
    ("", "--out '' names no file; give the file to write, e.g. --out model.pt"),
    ("somewhere/", "--out 'somewhere/' names no file; give the file to write, e.g. --out model.pt"),
    ("..", "--out '..' names no file; give the file to write, e.g. --out model.pt"),
    ("{run}", "--out {run} is a directory; give a file in it, e.g. --out {run}/model.pt"),
    ("{run}/config.yaml", "--out {run}/config.yaml is the run's own config.yaml; write the export elsewhere, "
                          "e.g. --out {run}/export.pt"),
    ("{run}/../rigl/checkpoint.pt", "--out {run}/../rigl/checkpoint.pt is the run's own checkpoint.pt; "
                                    "write the export elsewhere, e.g. --out {run}/export.pt"),
    ("{run}/final.json", "--out {run}/final.json is the run's own final.json"),
])
def test_a_bad_out_is_one_line_and_the_run_keeps_its_files(runs, tmp_path, out, message):
    run_dir = runs / "rigl"
    before = _files(run_dir)
    proc = _export(run_dir, "--out", out.format(run=run_dir), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith(f"sparseham export: {message.format(run=run_dir)}")
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""
    assert _files(run_dir) == before
    assert list(tmp_path.iterdir()) == []


def _file_size_limit(nbytes: int):
    def limit():  # writes past nbytes fail with EFBIG, as on a full disk (root ignores chmod)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.RLIM_INFINITY))
    return limit


def test_a_full_disk_is_one_line_with_status_1_and_the_old_export_stays(runs, tmp_path):
    out = tmp_path / "model.pt"
    out.write_bytes(b"the previous export")
    proc = _export(runs / "rigl", "--out", out, preexec_fn=_file_size_limit(10_000))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (f"sparseham export: cannot write {out}: File too large; free disk space or "
                           "choose a writable --out\n")
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare for a read-only mount")
def test_a_read_only_directory_is_one_line_with_status_1(runs, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    mount = f"mount --bind {ro} {ro} && mount -o remount,ro,bind {ro}"
    if subprocess.run(["unshare", "-rm", "sh", "-c", mount], capture_output=True).returncode:
        pytest.skip("no user namespaces here to mount a directory read-only")
    command = f"{mount} && exec {sys.executable} -m sparseham export {runs / 'rigl'} --out {ro / 'model.pt'}"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (f"sparseham export: cannot write {ro / 'model.pt'}: Read-only file system; free "
                           "disk space or choose a writable --out\n")
    assert list(ro.iterdir()) == []
