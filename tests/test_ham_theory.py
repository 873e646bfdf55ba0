"""HAM's theory (PAPER-NOTES §6) as tests, driving the real ``sparseham.HAM(torch.optim.SGD)``.

Everything is float64 on the CPU. The least-squares problem is ``analysis.linreg``'s: 100
parameters, 40 samples, a 5-sparse x*, f(x) = 1/2 |Zx - y|^2 (no 1/n factor), beta = 0 and
x0 = 1e-3 * ones. Plain GD is SGD without momentum at lr = eta. The Bregman projections come from
``analysis.linreg.bregman_projection``, which solves the KKT conditions with scipy and knows
nothing of HAM.

Measured on seed 0 (for the record; the asserts use bands): gap to the alpha = 10 projection
0.0330 / 0.0168 / 0.0085 at eta = 0.04 / 0.02 / 0.01 (ratios 0.51, 0.51); L1 of the limit 18.51,
17.05, 13.51, 11.06 for alpha = 1e-4, 1, 10, 100 (eta 0.1, 0.02, 0.04, 0.005); one-step error
ratio 0.251 per halving of eta, both signs, beta 0 and 2.
"""

import numpy as np
import pytest
import torch
from torch import nn

import sparseham
from sparseham.analysis.linreg import (
    bregman_projection,
    legendre,
    legendre_grad,
    legendre_grad_inv,
    make_problem,
    simulate,
)

# (alpha, eta): the largest of the halving etas at which each alpha is still stable here;
# alpha = 10 runs at three step sizes for the O(eta) gap.
RUNS = [(1e-4, 0.1), (1.0, 0.02), (10.0, 0.04), (10.0, 0.02), (10.0, 0.01), (100.0, 0.005)]
ALPHAS = (1e-4, 1.0, 10.0, 100.0)


@pytest.fixture(scope="module")
def problem():
    return make_problem(seed=0)


@pytest.fixture(scope="module")
def numpy_problem(problem):
    return tuple(t.numpy() for t in (problem.Z, problem.y, problem.x0, problem.x_star))


@pytest.fixture(scope="module")
def limits(problem):
    """The GD + HAM iterate after convergence, per (alpha, eta) run."""
    # The theory is about HAM's unclamped step: a trust region that never binds here.
    trace = simulate(problem, RUNS, steps=8000, tol=1e-11, clamp=50.0)
    return {run: x.numpy() for run, x in zip(RUNS, trace.x)}


@pytest.fixture(scope="module")
def projections(numpy_problem):
    Z, y, x0, _ = numpy_problem
    return {a: bregman_projection(Z, y, x0, a) for a in ALPHAS}


@pytest.mark.parametrize("alpha", ALPHAS)
def test_bregman_projection_satisfies_kkt(numpy_problem, projections, alpha):
    Z, y, x0, _ = numpy_problem
    x = projections[alpha]
    assert np.linalg.norm(Z @ x - y) < 1e-12
    # Stationarity: grad R(x) - grad R(x0) lies in the row space of Z.
    shift = legendre_grad(x, alpha) - legendre_grad(x0, alpha)
    lam = np.linalg.lstsq(Z.T, shift, rcond=None)[0]
    assert np.linalg.norm(Z.T @ lam - shift) < 1e-10 * max(1.0, np.linalg.norm(shift))
    # and (convexity) every feasible move along the null space of Z raises the objective.
    null = np.linalg.svd(Z)[2][len(y):]
    objective = lambda v: legendre(v, alpha).sum() - legendre_grad(x0, alpha) @ v
    rng = np.random.default_rng(0)
    for v in rng.standard_normal((20, len(null))) @ null:
        assert objective(x + 1e-2 * v) > objective(x)


def test_converges_to_an_interpolator(numpy_problem, limits):
    Z, y, _, _ = numpy_problem
    for run, x in limits.items():
        assert np.linalg.norm(Z @ x - y) < 1e-8, run


def test_limit_is_the_bregman_projection_of_x0(limits, projections):
    for (alpha, eta), x in limits.items():
        gaps = {a: np.linalg.norm(x - p) for a, p in projections.items()}
        assert gaps[alpha] < 3 * eta, (alpha, eta, gaps)  # O(eta); the constant grows with alpha
        assert min(gaps, key=gaps.get) == alpha, (alpha, eta, gaps)


def test_gap_to_the_projection_shrinks_in_proportion_to_eta(limits, projections):
    gaps = [np.linalg.norm(limits[(10.0, eta)] - projections[10.0]) for eta in (0.04, 0.02, 0.01)]
    ratios = [gaps[1] / gaps[0], gaps[2] / gaps[1]]
    assert all(0.35 < r < 0.65 for r in ratios), (gaps, ratios)


def test_alpha_moves_the_limit_from_min_l2_towards_sparse(numpy_problem, limits):
    Z, y, x0, x_star = numpy_problem
    final = {a: x for (a, eta), x in limits.items() if eta == max(e for b, e in limits if b == a)}
    l1 = [np.abs(final[a]).sum() for a in ALPHAS]
    assert all(b < a - 0.5 for a, b in zip(l1, l1[1:])), l1
    dist = [np.linalg.norm(final[a] - x_star) for a in ALPHAS]
    assert all(b < a for a, b in zip(dist, dist[1:])), dist
    # alpha -> 0: the Euclidean projection of x0, which is the min-L2 interpolator up to |x0|.
    euclid = x0 + np.linalg.lstsq(Z, y - Z @ x0, rcond=None)[0]
    assert np.linalg.norm(final[1e-4] - euclid) < 1e-4
    assert np.linalg.norm(final[1e-4] - np.linalg.pinv(Z) @ y) < 2e-2


def _one_step_error(eta, alpha, beta, sign):
    """Distance of one HAM(SGD) step from the Euler step of the HAM flow."""
    g = torch.Generator().manual_seed(3)
    x = (0.5 + 1.5 * torch.rand(8, 8, generator=g, dtype=torch.float64)) * (
        torch.randint(0, 2, (8, 8), generator=g) * 2 - 1)
    grad = torch.randn(8, 8, generator=g, dtype=torch.float64)
    p = nn.Parameter(x.clone())
    p.grad = grad
    sparseham.HAM(torch.optim.SGD([p], lr=eta), alpha, beta, sign=sign, max_norm=None, clamp=5.0).step()
    assert torch.equal(torch.sign(p.detach()), torch.sign(x))  # no sign crossing
    euler = x - eta * ((1 + alpha * x.abs()) * grad + beta * x)
    return (p.detach() - euler).abs().max().item()


@pytest.mark.parametrize("sign", ["half_step", "pre_step"])
@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_one_step_follows_the_ham_flow_to_second_order(sign, beta):
    errors = [_one_step_error(eta, 10.0, beta, sign) for eta in (1e-3, 5e-4, 2.5e-4)]
    ratios = [errors[1] / errors[0], errors[2] / errors[1]]
    assert all(0.2 < r < 0.3 for r in ratios), (errors, ratios)


def test_legendre_function_has_the_ham_metric():
    x = np.linspace(-3, 3, 61)
    x = x[np.abs(x) > 0.05]  # |x| is not differentiable at 0
    h = 1e-4
    for alpha in (0.5, 10.0, 200.0):
        d1 = (legendre(x + h, alpha) - legendre(x - h, alpha)) / (2 * h)
        np.testing.assert_allclose(d1, legendre_grad(x, alpha), rtol=1e-7, atol=1e-9)
        d2 = (legendre_grad(x + h, alpha) - legendre_grad(x - h, alpha)) / (2 * h)
        np.testing.assert_allclose(d2, 1 / (1 + alpha * np.abs(x)), rtol=1e-6)
        np.testing.assert_allclose(legendre_grad_inv(legendre_grad(x, alpha), alpha), x, rtol=1e-12)
    np.testing.assert_allclose(legendre(x, 1e-6), x**2 / 2, rtol=1e-5)
    for alpha in (1e4, 1e8, 1e12):  # alpha R / log(alpha) -> |x|, at rate |x|(log|x| - 1)/log(alpha)
        lead = np.abs(x) * (1 + (np.log(np.abs(x)) - 1) / np.log(alpha))
        np.testing.assert_allclose(alpha * legendre(x, alpha) / np.log(alpha), lead, atol=1e-3)


def test_loss_never_above_gd(problem):
    # The flow has df/dt = -sum (1 + alpha|x_i|) (d_i f)^2 <= -|grad f|^2: HAM is at least as fast.
    runs = [(None, 0.01), (1.0, 0.01), (10.0, 0.01)]
    loss = simulate(problem, runs, steps=2000).loss
    for j in (1, 2):
        assert (loss[:, j] <= loss[:, 0] + 1e-12).all(), runs[j]
    assert loss[-1, 2] < 1e-3 * loss[-1, 0]


def test_the_default_trust_region_keeps_the_direction_of_the_bias(problem, numpy_problem, limits):
    """At HAM's default clamp (0.02) the clamp binds on this problem's early steps (eta * alpha * |g|
    is up to ~0.5), so the limit is no longer the exact Bregman projection, but HAM still
    interpolates and larger alpha still gives a smaller L1 norm (README, "HAM's implicit bias")."""
    Z, y, _, _ = numpy_problem
    trace = simulate(problem, RUNS, steps=8000, tol=1e-11)
    clamped = {run: x.numpy() for run, x in zip(RUNS, trace.x)}
    assert all(np.linalg.norm(Z @ x - y) < 1e-8 for x in clamped.values())
    largest_eta = [max(RUNS, key=lambda r: (r[0] == a, r[1])) for a in ALPHAS]
    l1 = [np.abs(clamped[run]).sum() for run in largest_eta]
    assert all(b < a - 0.5 for a, b in zip(l1, l1[1:])), l1
    # weaker than the unclamped bias: the L1 norms sit between GD's and the unclamped HAM's
    unclamped = [np.abs(limits[run]).sum() for run in largest_eta]
    assert all(u - 1e-6 <= c <= l1[0] + 1e-6 for u, c in zip(unclamped, l1)), (unclamped, l1)

