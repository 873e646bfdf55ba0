"""RigL + HAM in your own PyTorch loop, on Fashion-MNIST: train, evaluate, checkpoint, resume.

    python examples/own_loop.py          # 300 steps (about a minute on one CPU core)
    SPARSEHAM_EXAMPLE_SMALL=1 python examples/own_loop.py   # 30 steps, what the tests run

The data comes from ``make data`` (the Debian package ``dataset-fashion-mnist``, or ``data/``).
"""

import os
import tempfile

import torch
import torch.nn.functional as F

import sparseham
from sparseham import methods
from sparseham.data import build_data

STEPS = 30 if os.environ.get("SPARSEHAM_EXAMPLE_SMALL") == "1" else 300
torch.manual_seed(0)
data = build_data("fashion_mnist", root="data", batch_size=128, seed=0)


def build():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 300), torch.nn.ReLU(),
                                torch.nn.Linear(300, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10))
    opt = sparseham.HAM(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), alpha=200, beta=1e-3)
    # RigL at 90% sparsity (ERK per-layer densities), the last layer kept dense.
    rigl = methods.get("rigl")(target=0.9, layer_density={"5.weight": 1.0}, update_every=20)
    mm = sparseham.MaskManager(model, opt, method=rigl, total_steps=STEPS,
                               tracker=sparseham.SignFlipTracker())
    return model, opt, mm


model, opt, mm = build()
batches = iter(data.train.epoch(0))
while mm.step_count < STEPS:  # RigL's update iterations change only the topology: count optimizer steps
    x, y = next(batches)
    F.cross_entropy(model(x), y).backward()
    mm.step()  # in place of opt.step(): mask grads, base + HAM step, re-mask, count flips, RigL update
    opt.zero_grad()

# Reading the device (sparsity, flips) is for log time, never inside the loop.
flips = mm.tracker.read()
print(f"steps {mm.step_count}, sparsity {mm.sparsity():.4f}, "
      f"flips {sum(v['masked'] + v['unmasked'] for v in flips.values()):,}")
print("HAM:", {k: v for k, v in opt.diagnostics().items() if k != "layers"})

correct = seen = 0
with torch.no_grad():
    for x, y in data.test.epoch(0):
        correct += int((model(x).argmax(1) == y).sum())
        seen += len(y)
print(f"test accuracy {correct / seen:.4f} on {seen:,} images")

# Checkpoint and resume in PyTorch's usual order: weights, then the manager, then the optimizer.
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "checkpoint.pt")
    torch.save({"model": model.state_dict(), "manager": mm.state_dict(), "opt": opt.state_dict()}, path)
    state = torch.load(path, weights_only=False)
    model2, opt2, mm2 = build()
    model2.load_state_dict(state["model"])
    mm2.load_state_dict(state["manager"])
    opt2.load_state_dict(state["opt"])
assert mm2.step_count == mm.step_count
assert all(torch.equal(a, b) for a, b in zip(mm.masks, mm2.masks))
mm.verify()  # every pruned weight is exactly 0 and every layer holds its count
print("resumed: same step count and masks")
