"""Real runs of the training app feeding the report, TensorBoard and the sweep runner."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from test_report import PNG_SIGNATURE, _images, _table

import sparseham.methods  # noqa: F401  (registers the built-in methods)
from sparseham.analysis import report
from sparseham.config import load_config
from sparseham.train.trainer import run

ROOT = Path(__file__).resolve().parents[1]
SETS = ["data.dataset=synthetic", "model.name=lenet300", "data.batch_size=64", "train.max_steps=48",
        "logging.log_every=8", "logging.progress=false", "checkpoint.every=0", "sparsity.target=0.9",
        "sparsity.rigl.update_every=16", "ham.alpha=20", "logging.histograms_every=24"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    paths = []
    for ham in (False, True):
        out = root / ("rigl_ham" if ham else "rigl")
        cfg = load_config(ROOT / "configs/default.yaml", [*SETS, f"ham.enabled={str(ham).lower()}",
                                                           f"tracking.per_weight={str(ham).lower()}"])
        assert run(cfg, out) == 0
        paths.append(out)
    html_path = report.write_report(paths, root / "report")
    return paths, html_path.read_text()


def test_report_of_two_real_runs(two_runs):
    paths, text = two_runs
    for heading in ["How the numbers are computed", "Comparison", "Run 1: rigl", "Run 2: rigl_ham"]:
        assert f">{heading}</h2>" in text
    images = _images(text)
    assert len(images) >= 12  # per run: rate, cumulative, fractions, masks, curves (+histogram); compare
    for png in images:
        assert png.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(png)) as img:
            img.load()
            assert img.width > 0 and img.height > 0
    rows = _table(text, "comparison")
    head, body = rows[0], rows[1:]
    for path, row in zip(paths, body):
        final = json.loads((path / "final.json").read_text())
        cell = dict(zip(head, row))
        assert cell["test acc"] == f"{final['test_acc']:.4f}"
        assert cell["sparsity"] == f"{final['sparsity']:.4f}"
        assert cell["unmasked flips"] == str(final["flips_unmasked"])


def test_tensorboard_has_scalars_layout_hparams_and_histograms(two_runs):
    path = two_runs[0][1]
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/acc", "train/lr", "eval/test_acc", "sparsity/global",
                "sparsity/fc1.weight", "flips/fc1.weight/masked", "flips/fc1.weight/unmasked",
                "churn/fc1.weight"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(8, 49, 8))
    assert "weights/fc1.weight" in tags["histograms"]
    tensors = EventAccumulator(str(path), size_guidance={"tensors": 0}).Reload()
    layout = layout_pb2.Layout()
    layout.ParseFromString(tensors.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["fc1.weight"] == ["flips/fc1.weight/masked", "flips/fc1.weight/unmasked"]
    hparams = EventAccumulator(str(path)).Reload().PluginTagToContent("hparams")
    assert set(hparams) >= {"_hparams_/experiment", "_hparams_/session_start_info"}
    assert b"alpha" in hparams["_hparams_/session_start_info"]


def test_sweep_runs_real_training_and_skips_finished(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sets = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in SETS)}
    spec = {"config": str(ROOT / "configs/default.yaml"), "out": str(tmp_path / "out"),
            "set": {**sets, "train.max_steps": 8, "logging.tensorboard": False},
            "grid": {"ham.enabled": [False, True]}}
    sweep.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "sparseham", "sweep", str(sweep)]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    finals = sorted((tmp_path / "out").glob("*/final.json"))
    assert len(finals) == 2
    stamps = [f.stat().st_mtime_ns for f in finals]
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "2 skipped" in again.stdout
    assert [f.stat().st_mtime_ns for f in finals] == stamps
    table = (tmp_path / "out" / "results.md").read_text()
    rows = [line.split(" | ")[0] for line in table.splitlines()[2:]]
    assert rows == ["| ham.enabled=false", "| ham.enabled=true"]
