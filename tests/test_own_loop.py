"""The library in a user's own loop: resume in any order, AMP skips, clipping with a scaler, every
LR scheduler, closures, misuse warnings, compiled models and per-layer densities (issue 12)."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseham import HAM, MaskManager, SignFlipTracker, layer_counts, methods

TOTAL = 40


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _batches(n: int = TOTAL) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def _setup(model: nn.Module, *, update_every: int = 5, reference: bool = True):
    opt = HAM(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), alpha=20.0, beta=1e-3)
    rigl = methods.get("rigl")(0.9, update_every=update_every, end=0.8, reference=reference)
    return opt, MaskManager(model, opt, rigl, tracker=SignFlipTracker(), total_steps=TOTAL)


def _train(model, opt, mm, batches) -> None:
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
        mm.step()
        opt.zero_grad()


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("order", ["weights_first", "manager_first"])
def test_resume_in_either_order_is_bit_identical(order):
    batches = _batches()
    whole = _model()
    opt, mm_whole = _setup(whole)
    _train(whole, opt, mm_whole, batches)

    half = _model()
    opt, mm = _setup(half)
    _train(half, opt, mm, batches[: TOTAL // 2])
    saved = copy.deepcopy({"model": half.state_dict(), "opt": opt.state_dict(), "mm": mm.state_dict()})
    nonzero = sum(int(torch.count_nonzero(p)) for p in saved["model"].values())

    fresh = _model()
    if order == "weights_first":  # PyTorch's usual order: weights, then the manager, then its state
        fresh.load_state_dict(saved["model"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt, mm = _setup(fresh)
        # Building the manager over loaded sparse weights zeroes none of them.
        assert sum(int(torch.count_nonzero(p)) for p in fresh.state_dict().values()) == nonzero
    else:
        opt, mm = _setup(fresh)
        fresh.load_state_dict(saved["model"])
    mm.load_state_dict(saved["mm"])
    opt.load_state_dict(saved["opt"])
    mm.verify()
    whole_steps = mm_whole.step_count
    _train(fresh, opt, mm, batches[TOTAL // 2:])
    assert mm.step_count == whole_steps == TOTAL - 7  # 7 of the 40 iterations only update the topology
    assert _same(fresh, whole)


def test_weights_loaded_without_the_manager_state_get_the_new_masks_at_the_first_step():
    sparse = _model()
    opt, mm = _setup(sparse)
    _train(sparse, opt, mm, _batches(12))  # RigL updated at steps 5 and 10: not set-up's masks
    fresh = _model()
    fresh.load_state_dict(sparse.state_dict())
    opt, mm = _setup(fresh)  # no load_state_dict: the new masks apply at the first step
    assert any(torch.count_nonzero(p * ~m) for p, m in zip(mm.params, mm.masks))
    _train(fresh, opt, mm, _batches(1))
    mm.verify()


def test_a_step_skipped_by_the_scaler_moves_nothing():
    model = _model()
    opt, mm = _setup(model, update_every=2, reference=False)  # updates on optimizer steps
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    batches = _batches(3)
    for x, y in batches[:1]:
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        mm.step(scaler)
        scaler.update()
        opt.zero_grad()
    before = (mm.step_count, [m.clone() for m in mm.masks], copy.deepcopy(model.state_dict()),
              mm.tracker.read())
    x, y = batches[1]  # step 2 is a RigL update step; its gradient is not finite
    scaler.scale(F.cross_entropy(model(x), y) * float("inf")).backward()
    mm.step(scaler)
    scaler.update()
    opt.zero_grad()
    assert mm.step_count == before[0] == 1
    assert all(torch.equal(a, b) for a, b in zip(mm.masks, before[1]))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before[2].values()))
    assert mm.tracker.read() == before[3] and len(mm.mask_events) == 1  # only set-up's masks
    x, y = batches[2]  # the next good step is the update step
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    mm.step(scaler)
    assert mm.step_count == 2 and len(mm.mask_events) == 2


def test_clip_then_step_with_a_scaler():
    model = _model()
    opt, mm = _setup(model)
    twin = copy.deepcopy(model)
    opt2, mm2 = _setup(twin)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = _batches(1)[0]
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    mm.step(scaler)  # the gradients are already unscaled: no "unscale_() has already been called"
    scaler.update()
    # The same step by hand, without a scaler.
    F.cross_entropy(twin(x), y).backward()
    norm2 = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.1)
    mm2.step()
    assert torch.allclose(norm, norm2) and norm > 0.1
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def _schedulers(opt):
    lr = torch.optim.lr_scheduler
    step = lambda: lr.StepLR(opt, 2)  # noqa: E731
    return {
        "LambdaLR": lambda: lr.LambdaLR(opt, lambda e: 0.9**e),
        "MultiplicativeLR": lambda: lr.MultiplicativeLR(opt, lambda e: 0.9),
        "StepLR": step,
        "MultiStepLR": lambda: lr.MultiStepLR(opt, [2, 4]),
        "ConstantLR": lambda: lr.ConstantLR(opt, factor=0.5, total_iters=3),
        "LinearLR": lambda: lr.LinearLR(opt, start_factor=0.25, total_iters=4),
        "ExponentialLR": lambda: lr.ExponentialLR(opt, 0.9),
        "SequentialLR": lambda: lr.SequentialLR(opt, [lr.ConstantLR(opt, 0.5, 2), lr.ExponentialLR(opt, 0.9)],
                                                milestones=[2]),
        "PolynomialLR": lambda: lr.PolynomialLR(opt, total_iters=5),
        "CosineAnnealingLR": lambda: lr.CosineAnnealingLR(opt, 5),
        "ChainedScheduler": lambda: lr.ChainedScheduler([lr.ConstantLR(opt, 0.5, 2),
                                                         lr.ExponentialLR(opt, 0.9)]),
        "ReduceLROnPlateau": lambda: lr.ReduceLROnPlateau(opt, patience=0),
        "CyclicLR": lambda: lr.CyclicLR(opt, 0.001, 0.1, step_size_up=2),
        "CosineAnnealingWarmRestarts": lambda: lr.CosineAnnealingWarmRestarts(opt, 2),
        "OneCycleLR": lambda: lr.OneCycleLR(opt, max_lr=0.1, total_steps=10),
    }


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.Adam])
def test_every_scheduler_constructs_and_steps_over_ham(base):
    lr_module = torch.optim.lr_scheduler
    every = {name for name, obj in vars(lr_module).items() if inspect.isclass(obj)
             and issubclass(obj, lr_module.LRScheduler) and obj.__module__ == lr_module.__name__
             and not name.startswith("_") and name != "LRScheduler"} | {"ReduceLROnPlateau"}
    kwargs = {"momentum": 0.9} if base is torch.optim.SGD else {}
    for name in sorted(every):
        lrs = []
        for wrap in (False, True):
            p = nn.Parameter(torch.ones(3, 3))
            inner = base([p], lr=0.1, **kwargs)
            opt = HAM(inner, alpha=1.0, beta=0.0) if wrap else inner
            sched = _schedulers(opt)[name]()  # a KeyError here: a scheduler this test does not know
            seen = []
            for _ in range(6):
                p.grad = torch.ones_like(p)
                opt.step()
                sched.step(1.0) if name == "ReduceLROnPlateau" else sched.step()
                seen.append(opt.param_groups[0]["lr"])
            lrs.append(seen)
        assert lrs[0] == lrs[1], name  # HAM's schedule is the base optimizer's
        assert len(set(lrs[1])) > 1, name  # and it moved


def test_closure_gives_the_same_step_and_returns_the_loss():
    batches = _batches(4)
    a, b = _model(), _model()
    (opt_a, mm_a), (opt_b, mm_b) = _setup(a), _setup(b)
    _train(a, opt_a, mm_a, batches)
    for x, y in batches:
        def closure(x=x, y=y):
            opt_b.zero_grad()
            loss = F.cross_entropy(b(x), y)
            loss.backward()
            return loss

        loss = mm_b.step(closure)
        assert loss is not None and loss.ndim == 0
    opt_b.zero_grad()
    assert _same(a, b)


def test_stepping_the_optimizer_directly_warns_once():
    model = _model()
    opt, mm = _setup(model)
    x, y = _batches(1)[0]
    with pytest.warns(UserWarning) as said:
        for _ in range(3):
            F.cross_entropy(model(x), y).backward()
            opt.step()  # the mistake: the pipeline does not run, pruned weights revive
            opt.zero_grad()
    assert len(said) == 1
    assert str(said[0].message) == (
        "the optimizer was stepped outside MaskManager.step(): pruned weights' gradients were not "
        "masked and pruned weights can revive; call mm.step() in place of optimizer.step()")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.cross_entropy(model(x), y).backward()
        mm.step()  # the right call never warns


def test_rigl_warns_when_it_would_never_update():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"rigl: no topology update will happen after the start: the next "
                                         r"would be at step 100, but updates end at step 75 \(end = 0.75 "
                                         r"of 100 steps\)"):
        MaskManager(model, opt, methods.get("rigl")(0.9, update_every=100), total_steps=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MaskManager(_model(), torch.optim.SGD(_model().parameters(), lr=0.1),
                    methods.get("rigl")(0.9, update_every=50), total_steps=100)


def test_compiled_model_has_the_plain_names_and_its_state_loads_uncompiled():
    model = _model()
    compiled = torch.compile(model)  # construction only: nothing is compiled until a forward
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mm = MaskManager(compiled, opt, methods.get("static")(0.9))
    assert mm.names == ["1.weight", "3.weight"]
    plain = MaskManager(_model(), torch.optim.SGD(model.parameters(), lr=0.1), methods.get("static")(0.9))
    plain.load_state_dict(mm.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(plain.masks, mm.masks))


def test_per_layer_densities_keep_exact_counts():
    shapes = {"fc1.weight": (300, 784), "fc2.weight": (100, 300), "fc3.weight": (10, 100)}
    counts = layer_counts(shapes, 0.9, "erk", fixed={"fc3*": 1.0, "fc1*": 0.05})
    assert counts["fc3.weight"] == 1000 and counts["fc1.weight"] == round(0.05 * 235200)
    assert sum(counts.values()) == round(0.1 * (235200 + 30000 + 1000))
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    for distribution in ("erk", "global"):
        mm = MaskManager(model, torch.optim.SGD(model.parameters(), lr=0.1),
                         methods.get("static")(0.9, distribution=distribution, init="magnitude",
                                               layer_density={"4.*": 1.0, "0.*": 0.05}))
        kept = mm.kept().tolist()
        assert kept[2] == 1000 and kept[0] == 11760 and sum(kept) == 26620, distribution


@pytest.mark.parametrize(("layer_density", "error", "match"), [
    ({"fc9*": 0.5}, ValueError,
     r"layer density 'fc9\*' matches no managed layer \(they are: 0.weight, 2.weight\)"),
    ({"0.*": 1.5}, ValueError, r"layer density '0.\*': 1.5: a density must be a number in \[0, 1\]"),
    ({"0.*": "half"}, ValueError, r"layer density '0.\*': 'half': a density must be a number in \[0, 1\]"),
    ([0.5], TypeError, r"layer_density maps glob patterns to densities, like \{'fc3\*': 1.0\}; got list"),
])
def test_per_layer_density_errors_are_one_line(layer_density, error, match):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(error, match=match):
        MaskManager(model, torch.optim.SGD(model.parameters(), lr=0.1),
                    methods.get("static")(0.5, layer_density=layer_density))
