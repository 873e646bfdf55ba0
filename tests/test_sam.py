"""SAM (Foret et al. 2021) and ASAM around a base optimizer, with HAM and inside the sparse pipeline."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparseham import HAM, SAM, MaskManager, SignFlipTracker, methods

A = torch.tensor([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 2.0]], dtype=torch.float64)
B = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def _grad(x):  # f(x) = x^T A x / 2 - b^T x
    return A @ x - B


BASES = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
         "adam": lambda ps: torch.optim.Adam(ps, lr=0.05)}


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("base", sorted(BASES))
def test_sam_matches_a_hand_written_reference_on_a_quadratic(base, adaptive):
    x = nn.Parameter(torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64))
    opt = SAM(BASES[base]([x]), rho=0.1, adaptive=adaptive)
    y = nn.Parameter(x.detach().clone())
    reference_base = BASES[base]([y])  # torch's own base step, fed the gradient SAM should use
    for _ in range(5):
        x.grad = _grad(x.detach())

        def closure():
            x.grad = _grad(x.detach())
            return (0.5 * x @ A @ x - B @ x).detach()

        opt.step(closure)
        with torch.no_grad():  # by hand: epsilon, the gradient at the perturbed point, the base step
            g = _grad(y)
            scale = y.abs() if adaptive else torch.ones_like(y)
            eps = 0.1 * scale**2 * g / torch.linalg.vector_norm(scale * g)
            y.grad = _grad(y + eps)
        reference_base.step()
        torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-12, atol=1e-12)


def test_sam_needs_a_closure():
    x = nn.Parameter(torch.ones(3))
    x.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="SAM needs a closure that recomputes the loss and its gradient"):
        SAM(torch.optim.SGD([x], lr=0.1)).step()


def _sparse_setup(sam_gradient="perturbed"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = HAM(SAM(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), rho=0.05), alpha=200.0,
              beta=1e-3, sam_gradient=sam_gradient)
    mm = MaskManager(model, opt, methods.get("rigl")(0.9, update_every=3, end=0.8), tracker=SignFlipTracker(),
                     total_steps=20)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(20)]
    return model, opt, mm, data


def _closure(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def test_pruned_weights_stay_zero_and_the_tracker_sees_only_real_steps():
    model, opt, mm, data = _sparse_setup()
    by_hand = 0
    for x, y in data[:12]:
        before = [p.detach().clone() for p in mm.params]
        updates = mm.tracker.steps
        mm.step(_closure(model, opt, x, y))
        if mm.topology_only:
            continue
        assert mm.tracker.steps == updates + 1  # one tracker update per real step, none for the perturbation
        for p, m in zip(mm.params, mm.masks):
            assert torch.all(p[~m] == 0)
        # flips between the weights before and after the real step (a perturbed state is never seen)
        by_hand += sum(int(((torch.sign(a) * torch.sign(b)) < 0).sum()) for a, b in zip(before, mm.params))
    counted = sum(r["masked"] + r["unmasked"] for r in mm.tracker.read().values())
    assert counted == by_hand > 0
    mm.verify()


def test_ham_sees_the_gradient_the_choice_names():
    results = {}
    for choice in ("perturbed", "original"):
        model, opt, mm, data = _sparse_setup(choice)
        for x, y in data[:6]:
            mm.step(_closure(model, opt, x, y))
        results[choice] = [p.detach().clone() for p in mm.params]
    assert any(not torch.equal(a, b) for a, b in zip(results["perturbed"], results["original"]))


def test_a_checkpoint_round_trip_is_bit_identical():
    model, opt, mm, data = _sparse_setup()
    for x, y in data[:8]:
        mm.step(_closure(model, opt, x, y))
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "mm": mm.state_dict()})
    for x, y in data[8:]:
        mm.step(_closure(model, opt, x, y))
    model2, opt2, mm2, _ = _sparse_setup()
    model2.load_state_dict(saved["model"])
    mm2.load_state_dict(saved["mm"])
    opt2.load_state_dict(saved["opt"])
    for x, y in data[8:]:
        mm2.step(_closure(model2, opt2, x, y))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_sam_through_the_app_trains_and_resumes_bit_identically(tmp_path):
    import json

    from sparseham.config import load_config
    from sparseham.train import run
    from sparseham.train.checkpoint import load_checkpoint

    sets = ["data.dataset=synthetic", "model.name=lenet300", "train.max_steps=24", "logging.log_every=6",
            "logging.tensorboard=false", "logging.progress=false", "checkpoint.every=12",
            "sparsity.rigl.update_every=6"]
    assert run(load_config("configs/rigl_ham_sam.yaml", sets), tmp_path / "whole") == 0
    final = json.loads((tmp_path / "whole" / "final.json").read_text())
    assert final["sparsity"] == pytest.approx(0.9, abs=1e-3) and final["steps"] == 24
    middle = tmp_path / "whole" / "checkpoint-12.pt"  # resume the same run from its step-12 checkpoint
    assert run(load_config("configs/rigl_ham_sam.yaml", [*sets, f"checkpoint.resume={middle}"]),
               tmp_path / "half") == 0
    a, b = (load_checkpoint(tmp_path / d / "checkpoint.pt")["model"] for d in ("whole", "half"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sam_with_fp16_is_refused_by_config_validation():
    from sparseham.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.amp = 'fp16': optim.sam with fp16 is not supported"):
        load_config("configs/rigl_ham_sam.yaml", ["data.dataset=synthetic", "train.amp=fp16"])
