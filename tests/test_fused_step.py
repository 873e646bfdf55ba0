"""The one-pass step (sparseham._step.one_pass) against the staged pipeline it replaces.

Two copies of the same model step side by side from identical gradients (no backward pass, so
tiny weight differences cannot change the gradients): one with ``HAM(fused=False)`` (every stage
its own pass) and one with the default ``fused=None`` (one compiled pass per tensor). After every
step the weights and optimizer state agree to float rounding and the tracker's codes and counts
and HAM's clamp counts are identical. Step 2's gradients hold exact zeros, NaN and +-inf.
"""

import pytest
import torch
from torch import nn

from sparseham import HAM, MaskManager, Method, SignFlipTracker, topk_mask
from sparseham._step import mirror, one_pass, signflip

pytestmark = pytest.mark.compiled


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc1 = nn.Linear(36, 16)
        self.fc2 = nn.Linear(16, 3)


class Swap(Method):
    """Random masks at 70%; every 3rd step one weight per layer is swapped for a pruned one."""

    def setup(self, manager):
        g = torch.Generator().manual_seed(0)
        self.counts = [int(0.3 * p.numel()) for p in manager.params]
        manager.set_masks([topk_mask(torch.rand(p.shape, generator=g), k)
                           for p, k in zip(manager.params, self.counts)], expected=self.counts)

    def post_step(self, manager):
        if manager.step_count % 3:
            return
        g = torch.Generator().manual_seed(manager.step_count)
        new, grown = [], []
        for p, m in zip(manager.params, manager.masks):
            keep = topk_mask(torch.where(m, torch.rand(p.shape, generator=g), -1.0), int(m.sum()) - 1)
            grow = topk_mask(torch.where(m, -1.0, torch.rand(p.shape, generator=g)), 1)
            new.append(keep | grow)
            grown.append(grow)
        manager.zero_state_(grown)
        manager.set_masks(new, expected=self.counts)


OPTIMIZERS = {
    "sgd": lambda ps, wd: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=wd),
    "sgd_nesterov": lambda ps, wd: torch.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True, weight_decay=wd),
    "sgd_dampening": lambda ps, wd: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.3,
                                                    weight_decay=wd),
    "sgd_plain": lambda ps, wd: torch.optim.SGD(ps, lr=0.05, weight_decay=wd),
    "adam": lambda ps, wd: torch.optim.Adam(ps, lr=1e-2, weight_decay=wd),
    "adamw": lambda ps, wd: torch.optim.AdamW(ps, lr=1e-2, weight_decay=wd),
}
# (HAM, masks, tracker, weight decay): every pair of flags takes all four values in some case.
CASES = [(1, 1, 1, 1), (1, 0, 0, 0), (0, 1, 1, 0), (0, 0, 0, 1), (1, 1, 0, 0), (0, 0, 1, 1)]


def _build(opt_name, ham_on, masks_on, tracker_on, wd, fused, tracker_kw=None, **ham_kw):
    torch.manual_seed(0)
    model = Net()
    base = OPTIMIZERS[opt_name](model.parameters(), 0.1 if wd else 0.0)
    kw = {"max_norm": 1.0, "diagnostics": 1, **ham_kw}  # the cap fires on fc1 (norm 1.3 at 70%)
    opt = HAM(base, 200.0, 1e-2, fused=fused, **kw) if ham_on else HAM(base, 0.0, 0.0, fused=fused)
    tracker = SignFlipTracker(**(tracker_kw or {})) if tracker_on else None
    if masks_on:
        mm = MaskManager(model, opt, Swap(0.7), tracker=tracker)
    else:  # a manager whose method never masks: dense training with the tracker
        mm = MaskManager(model, opt, _Dense(0.0), tracker=tracker)
    return model, opt, mm


class _Dense(Method):
    masking = False


def _grads(model, step):
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for p in model.parameters():
        grad = 0.3 * torch.randn(p.shape, generator=g)
        if step == 2:  # exact zeros, NaN and both infinities
            flat = grad.view(-1)
            flat[0], flat[1], flat[-1] = 0.0, float("nan"), float("inf")
            if flat.numel() > 3:
                flat[2] = float("-inf")
        out.append(grad)
    return out


def _run(pair, steps=5, check=True):
    for step in range(steps):
        for model, _, mm in pair:
            for p, grad in zip(model.parameters(), _grads(model, step)):
                p.grad = grad
            mm.step()
        if check:
            _assert_same(pair, step)


def _assert_same(pair, step):
    (m1, o1, mm1), (m2, o2, mm2) = pair
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        where = f"{name} after step {step}"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True,
                                   msg=lambda s, w=where: f"{w}: {s}")
        sa, sb = o1.state[a], o2.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6, equal_nan=True)
    if mm1.tracker is not None:
        for c1, c2 in zip(mm1.tracker.codes, mm2.tracker.codes):
            assert torch.equal(c1, c2)
        assert torch.equal(mm1.tracker.counters(), mm2.tracker.counters())
        assert mm1.tracker.steps == mm2.tracker.steps
        if mm1.tracker.hists is not None:
            assert all(torch.equal(a, b) for a, b in zip(mm1.tracker.hists, mm2.tracker.hists))
    d1, d2 = o1.diagnostics(reset=False), o2.diagnostics(reset=False)
    assert (d1["clamped"], d1["capped"], d1["steps"]) == (d2["clamped"], d2["capped"], d2["steps"])


@pytest.mark.parametrize("case", CASES, ids=lambda c: "ham{}-masks{}-tracker{}-wd{}".format(*c))
@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
def test_one_pass_equals_the_staged_pipeline(opt_name, case, monkeypatch):
    pair = [_build(opt_name, *case, fused=None), _build(opt_name, *case, fused=False)]
    assert pair[0][1].one_pass_blocker() is None and pair[1][1].one_pass_blocker() == "fused=False"
    staged_codes = []  # the codes the staged tracker update touched
    update_layer = signflip.update_layer
    monkeypatch.setattr(signflip, "update_layer", lambda w, code, *a: staged_codes.append(code) or
                        update_layer(w, code, *a))
    _run(pair)
    mm1, mm2 = pair[0][2], pair[1][2]
    if mm1.tracker is not None:  # the one-pass run's tracker was updated inside the optimizer step
        assert not any(c is d for c in staged_codes for d in mm1.tracker.codes)
        assert any(c is d for c in staged_codes for d in mm2.tracker.codes)
    if mm1.masks is not None:  # the masks went into the one-pass step: .grad was not masked in place
        assert any(bool((p.grad[~m] != 0).any()) for p, m in zip(mm1.params, mm1.masks))
        assert all(bool((p.grad[~m] == 0).all()) for p, m in zip(mm2.params, mm2.masks))
    if case[0]:
        assert pair[0][1].diagnostics()["clamped"] > 0  # the trust region was active: counts compared
        assert pair[1][1].diagnostics()["capped"] > 0


@pytest.mark.parametrize("opt_name", ["sgd_nesterov", "sgd_dampening", "sgd_plain"])
def test_one_pass_sgd_variants(opt_name):
    _run([_build(opt_name, 1, 1, 1, 1, fused=None), _build(opt_name, 1, 1, 1, 1, fused=False)])


def test_one_pass_pre_step_sign_histogram_and_interval():
    kw = {"sign": "pre_step", "tracker_kw": {"interval": 2, "per_weight": True}}
    _run([_build("sgd", 1, 1, 1, 1, fused=None, **kw), _build("sgd", 1, 1, 1, 1, fused=False, **kw)], steps=6)


def test_learning_rate_and_alpha_changes_do_not_recompile():
    from torch._dynamo.utils import counters

    model, opt, mm = _build("adamw", 1, 1, 1, 1, fused=None)
    _run([(model, opt, mm)], steps=2, check=False)  # compiles
    frames = counters["frames"]["ok"]
    for group in opt.param_groups:
        group["lr"] *= 0.5
        group["alpha"] = 20.0
    _run([(model, opt, mm)], steps=2, check=False)
    assert counters["frames"]["ok"] == frames


@pytest.mark.parametrize("make, reason", [
    (lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True), "amsgrad=True"),
    (lambda ps: torch.optim.SGD(ps, lr=1e-2, maximize=True), "maximize=True"),
    (lambda ps: torch.optim.RMSprop(ps, lr=1e-2), "RMSprop has no one-pass step"),
])
def test_unsupported_optimizers_run_staged(make, reason):
    torch.manual_seed(0)
    model = Net()
    opt = HAM(make(model.parameters()))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    assert reason in opt.one_pass_blocker()
    mm = MaskManager(model, opt, Swap(0.7), tracker=SignFlipTracker())
    mm.step()  # staged: the gradients were masked in place
    assert all(torch.all(p.grad[~m] == 0) for p, m in zip(mm.params, mm.masks))
    with pytest.warns(UserWarning, match="one-pass step does not apply"):
        HAM(make(model.parameters()), fused=True).step()


def test_a_watching_step_hook_gets_the_staged_pipeline():
    """A user's step pre-hook expects masked gradients in .grad: then the stages run staged."""
    model, opt, mm = _build("sgd", 1, 1, 1, 1, fused=None)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(all(
        bool(torch.all(p.grad[~m] == 0)) for p, m in zip(mm.params, mm.masks))))
    _run([(model, opt, mm)], steps=1, check=False)
    assert seen == [True]


def test_grouped_one_pass_equals_the_staged_pipeline(monkeypatch):
    """The CUDA layout (one compiled graph over a group's tensors), run here on CPU."""
    monkeypatch.setattr(one_pass, "GROUPED", {"cpu"})
    _run([_build("adamw", 1, 1, 1, 1, fused=None), _build("adamw", 1, 1, 1, 1, fused=False)])


def _broken_compile(fn, **kwargs):
    def fail(*args):
        raise RuntimeError("no compiler here")
    return fail


def test_a_failed_compile_runs_the_one_pass_step_eagerly(monkeypatch):
    one_pass.kernel.cache_clear()
    monkeypatch.setattr(torch, "compile", _broken_compile)
    try:
        with pytest.warns(UserWarning, match="one_pass kernel did not compile .*no compiler here.*eagerly"):
            _run([_build("sgd", 1, 1, 1, 1, fused=None), _build("sgd", 1, 1, 1, 1, fused=False)])
    finally:
        one_pass.kernel.cache_clear()  # the next tests compile again


def test_every_compiled_path_falls_back_to_eager(monkeypatch):
    """HAM(fused=True)'s mirror pass and SignFlipTracker(fused=True) too: same results, one warning."""
    caches = (mirror.compiled_pass, signflip._compiled_all)
    for cache in caches:
        cache.cache_clear()
    monkeypatch.setattr(torch, "compile", _broken_compile)
    try:
        x = [torch.randn(6, 5, generator=torch.Generator().manual_seed(i)) for i in range(2)]
        g = [torch.randn(6, 5, generator=torch.Generator().manual_seed(9 + i)) for i in range(2)]
        want = [t.clone() for t in x]
        mirror.ham(want, g, lr=0.1, alpha=20.0, beta=1e-2, clamp=0.02, foreach=False)
        with pytest.warns(UserWarning, match="mirror_degree_3 kernel did not compile .*HAM.fused=False"):
            mirror.ham(x, g, lr=0.1, alpha=20.0, beta=1e-2, clamp=0.02, fused=True)
        torch.testing.assert_close(x, want)
        trackers = [SignFlipTracker(fused=True), SignFlipTracker()]
        for t in trackers:
            t.attach(["a", "b"], [w.clone() for w in want])
        with pytest.warns(UserWarning, match="signflip kernel did not compile"):
            for t in trackers:
                t.update([-w for w in want], [w > 0 for w in want])
        assert trackers[0].read() == trackers[1].read() and trackers[0].read()["a"]["masked"] > 0
    finally:
        for cache in caches:
            cache.cache_clear()


def test_compiling_switched_off_runs_each_kernel_once_eagerly(monkeypatch):
    """TORCH_COMPILE_DISABLE=1: torch runs a compiled function, then fails on fullgraph; the step must
    not then run a second time eagerly (that applied the step twice)."""
    import warnings

    with torch._dynamo.config.patch(disable=True), warnings.catch_warnings():
        warnings.simplefilter("error")  # no "did not compile" warning either
        _run([_build("sgd", 1, 1, 1, 1, fused=None), _build("sgd", 1, 1, 1, 1, fused=False)])
