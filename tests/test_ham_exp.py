"""The polynomial exp of the fused mirror step: its degree, its float32 error against exp in float64,
and the steps that use it against a float64 reference of HAM Alg. 1."""

import math

import pytest
import torch
from torch._dynamo.utils import counters

from sparseham._step.mirror import ULP, exp_poly_degree, exp_poly_error_bound
from sparseham._step.mirror import exp_poly as _exp_poly
from sparseham.ham import ham

TWO_ULP = 2 * ULP  # 2^-23 relative: the ulp is float32's unit roundoff 2^-24
CLAMPS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
DEGREES = {0.005: 2, 0.01: 3, 0.02: 3, 0.05: 4, 0.1: 5, 0.2: 6, 0.5: None, 1.0: None}


def _grid(clamp: float) -> torch.Tensor:
    """200,001 float32 points over [-c, c] and the endpoints, c = float32(clamp) as the kernel clamps."""
    c = torch.tensor(clamp, dtype=torch.float32)
    x = torch.linspace(-c.item(), c.item(), 200_001, dtype=torch.float64).to(torch.float32)
    return torch.cat([x, torch.stack([-c, c])])


def _max_rel_error(clamp: float, degree: int | None) -> float:
    """Max relative error of the kernel's factor, evaluated in float32, against torch.exp in float64."""
    e = _grid(clamp)
    factor = torch.exp(e) if degree is None else _exp_poly(e, degree)
    assert factor.dtype == torch.float32
    exact = torch.exp(e.double())
    return ((factor.double() - exact).abs() / exact).max().item()


@pytest.mark.parametrize("clamp", CLAMPS)
def test_factor_matches_exp_to_two_ulp(clamp):
    degree = exp_poly_degree(clamp)
    assert degree == DEGREES[clamp]
    measured = _max_rel_error(clamp, degree)
    assert measured <= TWO_ULP, f"{measured / ULP:.3f} ulp"
    if degree is None:
        # No degree <= 8 is certified here (the rounding of Horner's sums alone nears 2 ulp), so the
        # kernel keeps torch.exp, itself within 1 ulp of the result's spacing, <= 2^-23 relative.
        assert exp_poly_error_bound(clamp, 8) > TWO_ULP
        return
    # The derived bound holds on the grid, and one degree less misses 2 ulp: the choice is tight.
    assert measured <= exp_poly_error_bound(clamp, degree) <= TWO_ULP
    assert _max_rel_error(clamp, degree - 1) > TWO_ULP


def test_large_clamps_use_exp():
    assert exp_poly_degree(5.0) is None  # the authors' clamp
    assert exp_poly_degree(0.283) is None and exp_poly_degree(0.28) == 8
    assert all(exp_poly_degree(c) is None for c in (0.0, -1.0, math.inf, math.nan))
    assert exp_poly_degree(0.02) == 3  # the default trust region


def _case(clamp: float, lr: float, alpha: float):
    """Weights and gradients whose exponents spread over about [-2c, 2c], with the special entries."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(64, 64, generator=g), torch.randn(8, 4, 3, 3, generator=g),
              torch.randn(6, 5, generator=g, dtype=torch.float64)]
    grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) * (clamp / (lr * alpha)) for p in params]
    w, d = params[0], grads[0]
    w[0, :4] = 0.0  # exact zeros stay zero, also against an infinite or NaN gradient
    d[0, 1], d[0, 2], d[0, 3] = math.inf, -math.inf, math.nan
    d[1, :3] = torch.tensor([math.nan, math.inf, -math.inf])  # no information; clamped; clamped
    d[2, 0] = 0.0  # only beta: a factor exp(-lr * beta)
    w[3, 0], w[3, 1], w[3, 2] = math.nan, math.inf, -math.inf  # stay NaN, inf, -inf
    return params, grads


def _reference(p, grad, lr, alpha, beta, clamp):
    """HAM Alg. 1 in float64: p * exp(clamp(-lr*(alpha*sign(p)*g + beta), -c, c)), NaN exponent -> 0."""
    x, g = p.double(), grad.double()
    e = -lr * (alpha * torch.sign(x) * g + beta)
    return x * torch.exp(torch.where(torch.isnan(e), 0.0, e).clamp(-clamp, clamp))


def _step_tolerance(clamp: float, lr: float, beta: float) -> float:
    """2 ulp for the factor, one rounding of p * factor, and the exponent's float32 roundings. Where
    they matter (|e| up to about the clamp) |lr*alpha*g| <= 2c + lr*beta, so the three roundings of
    -lr*alpha*g - lr*beta and float32(clamp) move e by at most 8 ulp * (c + lr*beta)."""
    return (1 + TWO_ULP) * (1 + ULP) * (1 + 8 * ULP * (clamp + lr * beta)) - 1


def _assert_close_to(out, ref, tol):
    out = out.double()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(out[torch.isinf(ref)], ref[torch.isinf(ref)])
    assert torch.all(out[ref == 0] == 0)
    normal = torch.isfinite(ref) & (ref != 0)
    rel = ((out - ref).abs() / ref.abs())[normal].max().item()
    assert rel <= tol, f"{rel / ULP:.3f} ulp > {tol / ULP:.3f}"


def _step(clamp, lr, alpha, beta, **impl):
    params, grads = _case(clamp, lr, alpha)
    before = [p.clone() for p in params]
    hits, _ = ham(params, grads, lr=lr, alpha=alpha, beta=beta, clamp=clamp, **impl)
    return before, grads, params, [int(h) for h in hits]


@pytest.mark.compiled
@pytest.mark.parametrize("clamp", [0.005, 0.02, 0.2, 5.0], ids=["deg2", "deg3_default", "deg6", "exp"])
def test_fused_and_foreach_steps_match_float64_reference(clamp):
    assert exp_poly_degree(clamp) == DEGREES.get(clamp)  # as the ids say (5.0: torch.exp)
    lr, alpha, beta = 0.1, 200.0, 1e-3
    tol = _step_tolerance(clamp, lr, beta)
    counts = []
    for impl in ({"fused": True}, {"foreach": True}):
        before, grads, after, hits = _step(clamp, lr, alpha, beta, **impl)
        for x, g, y in zip(before, grads, after):
            ref = _reference(x, g, lr, alpha, beta, clamp)
            # float64 tensors keep exp: HAM's own float64 tests hold them to 1e-12
            _assert_close_to(y, ref, 1e-13 if y.dtype == torch.float64 else tol)
        w, d = before[0], after[0]
        assert torch.equal(d[0, :4], torch.zeros(4))
        assert d[1, 0] == w[1, 0]  # NaN gradient: factor exactly 1
        assert d[1, 1] == pytest.approx(w[1, 1].item() * math.exp(-clamp * math.copysign(1, w[1, 1])),
                                        rel=tol)
        counts.append(hits)
    assert counts[0] == counts[1]  # the clamp count does not depend on how exp is computed
    assert counts[0][0] > 0


@pytest.mark.compiled
def test_fused_polynomial_does_not_recompile_on_an_lr_schedule():
    clamp = 0.02
    assert exp_poly_degree(clamp) is not None
    x = [torch.randn(7, 9, generator=torch.Generator().manual_seed(3))]
    g = [torch.full((7, 9), -1e-4)]
    graphs, start = [], counters["stats"]["unique_graphs"]
    for k in range(12):  # more distinct lrs than dynamo's recompile limit
        lr = 0.1 / (k + 1)
        before = x[0].clone()
        ham(x, g, lr=lr, alpha=200.0, beta=1e-3, clamp=clamp, fused=True, count=False)
        graphs.append(counters["stats"]["unique_graphs"])
        ref = _reference(before, g[0], lr, 200.0, 1e-3, clamp)
        _assert_close_to(x[0], ref, _step_tolerance(clamp, lr, 1e-3))
    assert graphs[0] > start  # compiled, not run eagerly past dynamo's recompile limit
    assert graphs[-1] == graphs[2], f"recompiled after the second lr: {graphs}"
