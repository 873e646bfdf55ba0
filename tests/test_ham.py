"""HAM against a hand-written reference of HAM Alg. 1, and its optimizer contract."""

import copy
import math

import pytest
import torch
from torch import nn

from sparseham import HAM, MaskManager, methods
from sparseham._step import mirror as _ham_kernels
from sparseham.ham import ham


def _params(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 5, generator=g, dtype=dtype)
    w[0, :3] = 0.0  # exact zeros must stay zero
    conv = torch.randn(4, 3, 2, 2, generator=g, dtype=dtype)
    bias = torch.randn(6, generator=g, dtype=dtype)
    return [nn.Parameter(t) for t in (w, conv, bias)]


def _grads(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def _reference_mirror(x_half, x_pre, g, lr, alpha, beta, clamp=5.0, sign="half_step"):
    """x_{k+1} = x_half * exp(clamp(-lr*(alpha*sign(s)*g + beta), -c, c)), elementwise in Python math."""
    out = x_half.clone()
    src = x_half if sign == "half_step" else x_pre
    flat_out, flat_src, flat_g = out.view(-1), src.reshape(-1), g.reshape(-1)
    for i in range(flat_out.numel()):
        s = math.copysign(1.0, flat_src[i].item()) if flat_src[i].item() != 0 else 0.0
        e = -lr * (alpha * s * flat_g[i].item() + beta)
        flat_out[i] = flat_out[i].item() * math.exp(min(max(e, -clamp), clamp))
    return out


def _run(make_opt, steps, lrs, alpha, beta, sign="half_step", ham_kwargs=None, clamp=5.0):
    """Run HAM and an independent reference side by side; return both parameter lists."""
    params = _params()
    ref = [p.detach().clone().requires_grad_(True) for p in params]
    opt = HAM(make_opt(params), alpha, beta, sign=sign, max_norm=None, clamp=clamp, **(ham_kwargs or {}))
    base_ref = make_opt(ref)
    for k in range(steps):
        grads = _grads(params, seed=10 + k)
        grads[0][0, :3] = 0.0  # with a zero gradient the base step keeps the zeros at zero
        for group in (opt.param_groups, base_ref.param_groups):
            group[0]["lr"] = lrs[k]
        for p, r, g in zip(params, ref, grads):
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        pre = [r.detach().clone() for r in ref]
        base_ref.step()
        with torch.no_grad():
            for r, x0, g in zip(ref, pre, grads):
                if r.ndim >= 2:
                    r.copy_(_reference_mirror(r, x0, g, lrs[k], alpha, beta, clamp=clamp, sign=sign))
    return params, ref


@pytest.mark.parametrize("sign", ["half_step", "pre_step"])
@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda ps: torch.optim.Adam(ps, lr=0.1),
    ],
    ids=["sgd_momentum_wd", "adam"],
)
@pytest.mark.parametrize("clamp", [5.0, 0.02], ids=["authors_clamp", "default_clamp"])
def test_matches_reference_formula(make_opt, sign, clamp):
    lrs = [0.1, 0.05, 0.02]  # a scheduled lr: the mirror step must use the current one
    params, ref = _run(make_opt, 3, lrs, alpha=20.0, beta=0.5, sign=sign, clamp=clamp)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-12, atol=1e-12)
    assert torch.all(params[0][0, :3] == 0), "exact zeros must stay zero"


def test_one_d_tensors_untouched():
    params = _params()
    plain = copy.deepcopy(params)
    grads = _grads(params)
    for p, q, g in zip(params, plain, grads):
        p.grad, q.grad = g.clone(), g.clone()
    HAM(torch.optim.SGD(params, lr=0.1), alpha=50.0, beta=1.0, clamp=5.0).step()
    torch.optim.SGD(plain, lr=0.1).step()
    assert torch.equal(params[2], plain[2])
    assert not torch.equal(params[0], plain[0])


@pytest.mark.compiled
@pytest.mark.parametrize("alpha", [0.0, 3.0, -3.0])
def test_foreach_matches_forloop_and_fused(alpha):
    params = [p.detach() for p in _params()[:2]]
    grads = _grads(params)
    grads[0][1, 1] = float("nan")
    grads[1][0, 0, 0, 0] = float("inf")
    outs = []
    for kw in ({"foreach": False}, {"foreach": True}, {"fused": True}):
        xs = [p.clone() for p in params]
        ham(xs, grads, lr=0.1, alpha=alpha, beta=0.2, clamp=5.0, max_norm=4.0, **kw)
        outs.append(xs)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_alpha_beta_zero_equals_base_exactly():
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    twin = copy.deepcopy(model)
    opt = HAM(torch.optim.Adam(model.parameters(), lr=1e-2), alpha=0.0, beta=0.0)
    base = torch.optim.Adam(twin.parameters(), lr=1e-2)
    x = torch.randn(16, 5)
    for _ in range(5):
        for m, o in ((model, opt), (twin, base)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_per_group_alpha_beta():
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2, 2))
    groups = [{"params": [a]}, {"params": [b], "alpha": 0.0, "beta": 0.0}]
    opt = HAM(torch.optim.SGD(groups, lr=0.1), 10.0, 0.0, clamp=5.0)
    a.grad, b.grad = torch.ones(2, 2), torch.ones(2, 2)
    opt.step()
    assert torch.allclose(b, torch.full((2, 2), 0.9))
    assert torch.allclose(a, torch.full((2, 2), 0.9 * math.exp(-0.1 * 10.0)))


def test_shares_groups_state_and_works_with_schedulers():
    model = nn.Linear(4, 3)
    base = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    opt = HAM(base)
    assert opt.param_groups is base.param_groups and opt.state is base.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)
    assert len(base.state) == 2  # momentum buffers, visible through both objects
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_add_param_group_reaches_base_and_gets_ham_keys():
    base = torch.optim.SGD([nn.Parameter(torch.ones(2, 2))], lr=0.1)
    opt = HAM(base, alpha=7.0, clamp=5.0)
    extra = nn.Parameter(torch.ones(3, 3))
    opt.add_param_group({"params": [extra]})
    assert len(base.param_groups) == 2
    assert base.param_groups[1]["alpha"] == 7.0 and base.param_groups[1]["lr"] == 0.1


def test_state_dict_round_trip_resumes_bit_identically():
    def make():
        torch.manual_seed(0)
        m = nn.Linear(6, 4)
        return m, HAM(torch.optim.Adam(m.parameters(), lr=1e-2), alpha=5.0, beta=1e-2)

    def train(m, o, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            o.zero_grad()
            m(torch.randn(8, 6, generator=g)).pow(2).mean().backward()
            o.step()

    m1, o1 = make()
    train(m1, o1, 3, 1)
    train(m1, o1, 3, 2)
    m2, o2 = make()
    train(m2, o2, 3, 1)
    sd_model, sd_opt = copy.deepcopy(m2.state_dict()), copy.deepcopy(o2.state_dict())
    assert sd_opt["param_groups"][0]["alpha"] == 5.0
    m3, o3 = make()
    m3.load_state_dict(sd_model)
    o3.load_state_dict(sd_opt)
    assert o3.param_groups is o3.optimizer.param_groups and o3.state is o3.optimizer.state
    train(m3, o3, 3, 2)
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)


def test_step_hooks_run_around_the_whole_step():
    p = nn.Parameter(torch.ones(2, 2))
    opt = HAM(torch.optim.SGD([p], lr=0.1), alpha=1.0, beta=0.0, clamp=5.0)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(("pre", p.detach().clone())))
    opt.register_step_post_hook(lambda o, a, k: seen.append(("post", p.detach().clone())))
    p.grad = torch.ones(2, 2)
    opt.step()
    assert [s for s, _ in seen] == ["pre", "post"]
    assert torch.equal(seen[0][1], torch.ones(2, 2))
    assert torch.allclose(seen[1][1], torch.full((2, 2), 0.9 * math.exp(-0.1)))


def test_rmsprop_alpha_key_does_not_clash():
    p = nn.Parameter(torch.ones(2, 2))
    opt = HAM(torch.optim.RMSprop([p], lr=0.01, alpha=0.99), alpha=3.0, clamp=5.0)
    assert opt.param_groups[0]["alpha"] == 0.99 and opt.param_groups[0]["ham_alpha"] == 3.0
    p.grad = torch.ones(2, 2)
    opt.step()
    # RMSprop's own step with alpha 0.99: v = 0.01, p = 1 - 0.01 * 1 / (sqrt(0.01) + 1e-8); then HAM's
    # mirror step with ham_alpha 3 (not RMSprop's 0.99): p *= exp(-0.01 * 3 * sign(p) * 1).
    half = 1 - 0.01 / (math.sqrt(0.01) + 1e-8)
    assert torch.allclose(p.detach(), torch.full((2, 2), half * math.exp(-0.01 * 3.0)), atol=1e-7)


def test_custom_base_optimizer():
    class SignSGD(torch.optim.Optimizer):
        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for q in group["params"]:
                    q.add_(q.grad.sign(), alpha=-group["lr"])

    p = nn.Parameter(torch.tensor([[2.0, -2.0]]))
    opt = HAM(SignSGD([p], lr=0.5), alpha=1.0, beta=0.0, clamp=5.0)
    p.grad = torch.tensor([[1.0, 1.0]])
    opt.step()
    expected = torch.tensor([[1.5 * math.exp(-0.5), -2.5 * math.exp(0.5)]])
    torch.testing.assert_close(p.detach(), expected)


def test_negative_alpha_flattens():
    p = nn.Parameter(torch.tensor([[1.0]]))
    opt = HAM(torch.optim.SGD([p], lr=0.1), alpha=-2.0, beta=0.0, clamp=5.0)
    p.grad = torch.tensor([[1.0]])
    opt.step()
    assert p.item() == pytest.approx(0.9 * math.exp(0.2))


def test_nonfinite_gradient_keeps_weight_finite():
    x = [torch.tensor([[1.0, -2.0, 3.0, 0.0]])]
    g = [torch.tensor([[float("nan"), float("inf"), -float("inf"), float("inf")]])]
    for kw in ({"foreach": False}, {"foreach": True}):
        y = [x[0].clone()]
        ham(y, g, lr=0.1, alpha=200.0, beta=0.0, clamp=5.0, **kw)
        assert torch.isfinite(y[0]).all()
        assert y[0][0, 0] == 1.0  # NaN gradient: no information, factor 1
        assert y[0][0, 3] == 0.0  # zero stays zero even against an infinite gradient
        assert y[0][0, 1] == pytest.approx(-2.0 * math.exp(5.0))  # clamped exponent


def test_max_norm_guards_overflow_and_the_trust_region_prevents_it():
    """The paper's alpha=200 with lr=0.05 overflows a small MLP with the authors' clamp of 5 unless the
    norm cap guards it; the default trust region (clamp 0.02) keeps it finite with no cap at all."""

    def train(max_norm, clamp):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10))
        opt = HAM(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), 200.0, 1e-3, max_norm=max_norm,
                  clamp=clamp)
        x, y = torch.randn(64, 20), torch.randint(0, 10, (64,))
        for _ in range(60):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        return [p for p in model.parameters() if p.ndim >= 2], loss.item()

    unguarded, _ = train(None, 5.0)
    assert not all(torch.isfinite(p).all() for p in unguarded)
    guarded, _ = train(1000.0, 5.0)
    assert all(torch.isfinite(p).all() for p in guarded)
    assert all(torch.linalg.vector_norm(p) <= 1000.0 * (1 + 1e-5) for p in guarded)
    trusted, loss = train(None, 0.02)
    assert all(torch.isfinite(p).all() and torch.linalg.vector_norm(p) < 100 for p in trusted)
    assert loss < 1.0  # and it fits the batch (chance is ln 10 = 2.3)


def test_grad_scaler_sees_unscaled_grads_and_skips_inf_steps():
    p = nn.Parameter(torch.tensor([[1.0, -1.0]]))
    opt = HAM(torch.optim.SGD([p], lr=0.1), alpha=2.0, beta=0.0, clamp=5.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale((p * torch.tensor([[1.0, 2.0]])).sum()).backward()
    scaler.step(opt)
    scaler.update()
    g = torch.tensor([[1.0, 2.0]])
    x_half = torch.tensor([[0.9, -1.2]])
    expected = x_half * torch.exp(-0.1 * 2.0 * x_half.sign() * g)
    torch.testing.assert_close(p.detach(), expected)
    before = p.detach().clone()
    opt.zero_grad()
    scaler.scale((p * float("inf")).sum()).backward()
    scaler.step(opt)  # found inf: the scaler skips the whole HAM step
    scaler.update()
    assert torch.equal(p.detach(), before)


def test_gradient_accumulation_uses_the_accumulated_grad():
    p = nn.Parameter(torch.tensor([[1.0]]))
    opt = HAM(torch.optim.SGD([p], lr=0.1), alpha=1.0, beta=0.0, clamp=5.0)
    for _ in range(3):
        (p.sum() * 0.5).backward()  # three micro-batches, grad 0.5 each
    opt.step()
    assert p.item() == pytest.approx((1.0 - 0.15) * math.exp(-0.1 * 1.5))


def test_half_step_allocates_no_persistent_state():
    model = nn.Linear(8, 8)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = HAM(base)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
    assert {k for s in opt.state.values() for k in s} == {"momentum_buffer"}
    assert set(vars(opt)) - set(vars(base)) <= {
        "optimizer",
        "_keys",
        "sign",
        "clamp",
        "max_norm",
        "min_ndim",
        "foreach",
        "fused",
        "diagnostics_every",
        "sam_gradient",
        "_calls",
        "_counted",
        "_hits",
        "_caps",
        "_steps",
        "_warned_staged",
        "_names",  # parameter -> name, for the diagnostics (no tensor of its own)
    }
    # The diagnostics keep two counters per tensor, never per weight.
    assert all(t.ndim == 0 for t in [*opt._hits.values(), *opt._caps.values()])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sign": "post"}, "Invalid sign: 'post'"),
        ({"clamp": 0.0}, "Invalid clamp value: 0.0"),
        ({"max_norm": -1.0}, "Invalid max_norm value: -1.0"),
        ({"foreach": True, "fused": True}, "cannot be `True` together"),
    ],
)
def test_argument_errors(kwargs, match):
    opt = torch.optim.SGD([nn.Parameter(torch.ones(2, 2))], lr=0.1)
    with pytest.raises((ValueError, RuntimeError), match=match):
        HAM(opt, **kwargs)


def test_wraps_only_optimizers():
    with pytest.raises(TypeError, match="HAM wraps a torch.optim.Optimizer, got list"):
        HAM([nn.Parameter(torch.ones(1))])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_has_no_host_sync():
    model = nn.Linear(64, 64).cuda()
    opt = HAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    model(torch.randn(8, 64, device="cuda")).sum().backward()
    opt.step()  # warm up lazily created state outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.compiled
def test_fused_follows_an_lr_schedule():
    p = nn.Parameter(torch.ones(3, 3))
    opt = HAM(torch.optim.SGD([p], lr=0.1), alpha=2.0, beta=0.0, fused=True, clamp=5.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    expected = 1.0
    for k in range(12):  # more distinct lrs than dynamo's recompile limit
        lr = 0.1 / (k + 1)  # the lr this step must use
        p.grad = torch.ones(3, 3)
        opt.step()
        sched.step()
        expected = (expected - lr) * math.exp(-lr * 2.0)  # SGD, then the mirror step at the same lr
    assert torch.allclose(p.detach(), torch.full((3, 3), expected), rtol=1e-5)


def test_norm_cap_does_not_spread_a_nan():
    for kw in ({"foreach": False}, {"foreach": True}):
        x = [torch.tensor([[float("nan"), 2.0], [3.0, 4.0]])]
        ham(x, [torch.zeros(2, 2)], lr=0.1, alpha=1.0, beta=0.0, max_norm=1.0, **kw)
        assert torch.isnan(x[0][0, 0]) and torch.equal(x[0][1], torch.tensor([3.0, 4.0]))


def test_cpu_norm_cap_multiplies_only_the_capped_tensors(monkeypatch):
    # On CPU the cap reads its scales on the host and skips the tensors it leaves alone; the result
    # and the flags equal the device path's (every tensor multiplied by its scale, 1 or less).
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(4, 5, generator=g) * s for s in (0.1, 10.0, 0.5, 30.0)]
    tensors.append(torch.tensor([[float("nan"), 1e3]]))  # non-finite: left alone on both paths
    tensors.append(torch.tensor([[-0.0, 0.0]]))  # -0.0 * 1 is -0.0: nothing to tell apart
    multiplied = []  # the number of tensors of each _foreach_mul_ call
    real_mul = torch._foreach_mul_

    def spy(ts, scales):
        multiplied.append(len(ts))
        return real_mul(ts, scales)

    results = {}
    for free in (_ham_kernels.HOST_READS_FREE, frozenset()):
        xs = [t.clone() for t in tensors]
        monkeypatch.setattr(_ham_kernels, "HOST_READS_FREE", free)
        monkeypatch.setattr(torch, "_foreach_mul_", spy)
        multiplied.clear()
        flags = _ham_kernels.cap_norms_(xs, 20.0)
        results[free] = (xs, [int(f) for f in flags], list(multiplied))
        monkeypatch.undo()
    (cpu, cpu_flags, cpu_calls), (device, device_flags, device_calls) = results.values()
    assert cpu_flags == device_flags == [0, 1, 0, 1, 0, 0]
    assert cpu_calls == [2] and device_calls == [6]  # only the two capped tensors on CPU
    for a, b in zip(cpu, device):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))  # bit for bit, NaN and -0.0 too
    assert all(torch.linalg.vector_norm(cpu[i]) <= 20.0 * (1 + 1e-6) for i in (1, 3))


@pytest.mark.parametrize("impl", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_diagnostics_count_clamped_entries_and_caps(impl):
    p = nn.Parameter(torch.ones(2, 5))
    bias = nn.Parameter(torch.zeros(5))  # 1-D: never mirrored, never counted
    opt = HAM(torch.optim.SGD([p, bias], lr=0.1), alpha=10.0, beta=0.0, clamp=0.5, max_norm=3.0,
              diagnostics=1, **impl)
    # lr * alpha * |g| is 1.0 on the first row (beyond the clamp 0.5) and 0.1 on the second.
    grad = torch.tensor([[1.0] * 5, [0.1] * 5])
    for _ in range(2):
        p.grad, bias.grad = grad.clone(), torch.ones(5)
        with torch.no_grad():
            p.fill_(1.0)  # the same 5 entries clamp at each step
        opt.step()  # the weights shrink (norm < 3): no cap
    diag = opt.diagnostics({p: "w", bias: "b"})
    assert (diag["clamped"], diag["entries"], diag["clamped_fraction"]) == (10, 20, 0.5)
    assert diag["capped"] == 0 and diag["steps"] == 2 and set(diag["layers"]) == {"w"}
    assert opt.diagnostics()["steps"] == 0  # the read reset the counters

    for _ in range(3):
        p.grad = torch.full((2, 5), -2.0)  # every exponent is +2: clamped to 0.5, weights grow
        with torch.no_grad():
            p.fill_(1.0)
        opt.step()  # 1.2 * e^0.5 per entry: norm 6.3 > 3, so the cap rescales the tensor
    diag = opt.diagnostics({p: "w"})
    assert diag["clamped_fraction"] == 1.0 and diag["clamped"] == 30 and diag["capped"] == 3
    assert diag["layers"]["w"] == {"clamped_fraction": 1.0, "capped": 3}
    assert torch.linalg.vector_norm(p.detach()).item() == pytest.approx(3.0, rel=1e-6)


def test_diagnostics_fraction_on_a_mixed_tensor():
    p = nn.Parameter(torch.ones(2, 5))
    opt = HAM(torch.optim.SGD([p], lr=0.1), alpha=10.0, beta=0.0, clamp=0.5, max_norm=None, diagnostics=1)
    p.grad = torch.tensor([[-1.0] * 5, [-0.1] * 5])  # exponents +1.0 (clamped) and +0.1
    opt.step()
    diag = opt.diagnostics()
    assert diag["clamped_fraction"] == 0.5 and diag["capped"] == 0
    expected = torch.tensor([[1.1 * math.exp(0.5)] * 5, [1.01 * math.exp(0.1)] * 5])
    assert torch.allclose(p.detach(), expected)


def test_diagnostics_count_every_nth_step():
    p = nn.Parameter(torch.ones(2, 5))
    opt = HAM(torch.optim.SGD([p], lr=0.1), alpha=10.0, beta=0.0, clamp=0.5, max_norm=None, diagnostics=4)
    for _ in range(9):  # calls 4 and 8 count
        p.grad = torch.tensor([[-1.0] * 5, [-0.1] * 5])
        opt.step()
    diag = opt.diagnostics()
    assert (diag["steps"], diag["clamped"], diag["entries"], diag["clamped_fraction"]) == (9, 10, 20, 0.5)
    off = HAM(torch.optim.SGD([p], lr=0.1), diagnostics=0)
    p.grad = torch.ones(2, 5)
    off.step()
    assert off.diagnostics()["entries"] == 0
    with pytest.raises(ValueError, match=r"Invalid diagnostics value: True; an int >= 0"):
        HAM(torch.optim.SGD([p], lr=0.1), diagnostics=True)


def test_beta_alone_shrinks_every_mirrored_weight():
    p, b = nn.Parameter(torch.full((2, 3), 2.0)), nn.Parameter(torch.ones(3))
    opt = HAM(torch.optim.SGD([p, b], lr=0.1), alpha=0.0, beta=0.5, clamp=5.0)
    p.grad, b.grad = torch.zeros(2, 3), torch.zeros(3)
    opt.step()
    # By hand: no gradient, so the base step keeps 2.0; the mirror step multiplies by e^(-0.1 * 0.5).
    assert torch.allclose(p.detach(), torch.full((2, 3), 2.0 * math.exp(-0.05)))
    assert torch.equal(b.detach(), torch.ones(3))  # 1-D: no mirror step


def test_diagnostics_name_layers_by_parameter_name():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(16, 4)

    def step(opt):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()

    named = HAM(torch.optim.SGD(model.named_parameters(), lr=0.1), diagnostics=1)
    step(named)
    assert set(named.diagnostics()["layers"]) == {"0.weight", "2.weight"}
    plain = HAM(torch.optim.SGD(model.parameters(), lr=0.1), diagnostics=1)
    step(plain)
    assert set(plain.diagnostics()["layers"]) == {"0.0", "0.2"}  # group.index: no names known
    MaskManager(model, plain, methods.get("static")(0.5))
    step(plain)
    assert set(plain.diagnostics()["layers"]) == {"0.weight", "2.weight"}


def _mirror_reference(x_half: float, g: float, lr: float, alpha: float, beta: float, clamp: float) -> float:
    """HAM Alg. 1's mirror step on one entry, in plain Python (HYP*: the sign of the half step)."""
    sign = (x_half > 0) - (x_half < 0)
    e = min(max(-lr * (alpha * sign * g + beta), -clamp), clamp)
    return x_half * math.exp(e)


@pytest.mark.compiled
@pytest.mark.parametrize("impl", [{"fused": None}, {"fused": True}, {"fused": False},
                                  {"fused": False, "foreach": False}],
                         ids=["auto", "fused", "foreach", "forloop"])
@pytest.mark.parametrize("base", ["sgd", "adam", "rmsprop"])
def test_every_path_uses_each_groups_alpha_and_beta(base, impl):
    """Two param groups with their own alpha and beta (one with alpha 0, beta only), every HAM
    path, against the base optimizer alone followed by the mirror step written out per entry."""
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    grads = [torch.randn(4, 5, generator=g, dtype=torch.float64) * 0.5 for _ in range(3)]
    bias, bias_grad = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(2))
    make = {"sgd": lambda gs: torch.optim.SGD(gs, lr=0.1, momentum=0.9),
            "adam": lambda gs: torch.optim.Adam(gs, lr=0.05),
            "rmsprop": lambda gs: torch.optim.RMSprop(gs, lr=0.01)}[base]
    ham_keys = ("ham_alpha", "ham_beta") if base == "rmsprop" else ("alpha", "beta")
    settings = [(30.0, 0.01), (0.0, 0.02)]

    def build():
        ps = [nn.Parameter(w.clone()) for w in weights] + [nn.Parameter(bias.clone())]
        groups = [{"params": [ps[0], ps[1], ps[3]]}, {"params": [ps[2]]}]
        return ps, groups

    ps, groups = build()
    for group, (a, b) in zip(groups, settings):
        group.update({ham_keys[0]: a, ham_keys[1]: b})
    opt = HAM(make(groups), alpha=7.0, beta=0.5, clamp=0.05, **impl)  # defaults that must not be used
    ref, ref_groups = build()
    plain = make(ref_groups)
    for _ in range(3):
        for p, q, grad in zip(ps, ref, [*grads, bias_grad]):
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        plain.step()
        with torch.no_grad():
            for group, (a, b) in zip(ref_groups, settings):
                lr = group["lr"]
                for q in group["params"]:
                    if q.ndim < 2:
                        continue
                    flat = q.view(-1)
                    for i, (x, gi) in enumerate(zip(flat.tolist(), q.grad.view(-1).tolist())):
                        flat[i] = _mirror_reference(x, gi, lr, a, b, 0.05)
        for p, q in zip(ps, ref):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-12)
