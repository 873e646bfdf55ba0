"""Train a short run with the app, export it (dense, masks, CSR), and load it into the plain model.

    python examples/export_and_reload.py   # 400 steps of configs/default.yaml (RigL 95% + HAM, LeNet-5)
    SPARSEHAM_EXAMPLE_SMALL=1 python examples/export_and_reload.py   # 40 steps, what the tests run

The same from the command line: ``sparseham train --config default --out RUN`` and
``sparseham export RUN --out model.pt --format dense`` (or ``masks``, ``sparse``).
"""

import os
import tempfile
from pathlib import Path

import torch

from sparseham.config import load_config
from sparseham.data import build_data
from sparseham.export import export_run, load_sparse
from sparseham.models import build_model
from sparseham.train import run

STEPS = 40 if os.environ.get("SPARSEHAM_EXAMPLE_SMALL") == "1" else 400

with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp)
    cfg = load_config("default", [f"train.max_steps={STEPS}", "logging.tensorboard=false",
                                  "logging.progress=false", "sparsity.rigl.update_every=10"])
    assert run(cfg, out / "run") == 0  # exit status: 0 for a finished run

    for fmt in ("dense", "masks", "sparse"):
        stats = export_run(out / "run", out / f"{fmt}.pt", fmt)
        print(f"{fmt:>6}: {stats['bytes']:>9,} bytes ({stats['ratio']:.2f}x smaller than dense)")

    # The dense file is a plain state_dict: any code with the model class loads it.
    model = build_model("lenet5", num_classes=10, in_channels=1, image_size=28)
    model.load_state_dict(torch.load(out / "dense.pt", weights_only=True))
    masks = torch.load(out / "masks.pt", weights_only=True)
    sparse = load_sparse(out / "sparse.pt")  # the CSR file, back to the dense state_dict

for name, mask in masks.items():
    weight = model.state_dict()[name]
    assert bool((weight[~mask] == 0).all()) and torch.equal(sparse[name], weight), name
kept = sum(int(m.sum()) for m in masks.values())
print(f"{len(masks)} managed tensors, {1 - kept / sum(m.numel() for m in masks.values()):.4f} sparse")

# Evaluate with the app's preprocessing: build_data normalises as the training run did.
data = build_data("fashion_mnist", root="data", batch_size=128, seed=0)
model.eval()
correct = seen = 0
with torch.no_grad():
    for x, y in data.test.epoch(0):
        correct += int((model(x).argmax(1) == y).sum())
        seen += len(y)
print(f"reloaded model: test accuracy {correct / seen:.4f}")
