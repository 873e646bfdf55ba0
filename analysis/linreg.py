r"""Implicit bias of GD + HAM on underdetermined least squares (HAM App. D.1, PAPER-NOTES §4).

The problem: :math:`f(x) = \tfrac12\|Zx - y\|^2` with ``Z`` of shape (40, 100) (40 samples, 100
parameters), entries i.i.d. :math:`N(0, 1/40)`, a 5-sparse ground truth with entries
:math:`\pm(1 + U[0, 1])`, and :math:`y = Zx^*`. Every run starts at :math:`x_0 = 10^{-3}\mathbf 1`.

With :math:`\beta = 0` the HAM flow is the mirror flow of the Legendre function
:math:`R_\alpha(x) = \sum_i ((1 + \alpha|x_i|)\log(1 + \alpha|x_i|) - \alpha|x_i|)/\alpha^2`, so it
converges to the Bregman projection :math:`\arg\min_{Zx = y} R_\alpha(x) - \langle\nabla
R_\alpha(x_0), x\rangle`; discrete steps land :math:`O(\eta)` away (PAPER-NOTES §6.2-6.3).
:func:`bregman_projection` computes it independently of HAM, from the dual problem.

``python -m sparseham.analysis.linreg [--out DIR] [--steps N]`` writes ``linreg.png``, ``linreg.md`` and
``linreg.csv`` to ``DIR``.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.optimize
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

import sparseham

__all__ = [
    "Problem",
    "Trace",
    "bregman_projection",
    "legendre",
    "legendre_grad",
    "legendre_grad_inv",
    "main",
    "make_problem",
    "simulate",
]

ALPHAS = (0.01, 1.0, 10.0, 100.0)
X0_SCALE = 1e-3


@dataclass(frozen=True)
class Problem:
    """An underdetermined least-squares problem ``y = Z x_star`` (float64)."""

    Z: Tensor
    y: Tensor
    x_star: Tensor

    @property
    def x0(self) -> Tensor:
        """The shared initialisation ``1e-3 * ones``: small, so every weight starts near 0."""
        return torch.full_like(self.x_star, X0_SCALE)


def make_problem(n_params: int = 100, n_samples: int = 40, k: int = 5, seed: int = 0) -> Problem:
    """Gaussian design N(0, 1/n_samples) and a k-sparse ground truth with |x*_i| in [1, 2]."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n_samples, n_params, generator=g, dtype=torch.float64) / n_samples**0.5
    x_star = torch.zeros(n_params, dtype=torch.float64)
    support = torch.randperm(n_params, generator=g)[:k]
    signs = torch.randint(0, 2, (k,), generator=g).double() * 2 - 1
    x_star[support] = signs * (1 + torch.rand(k, generator=g, dtype=torch.float64))
    return Problem(Z, Z @ x_star, x_star)


def legendre(x: np.ndarray, alpha: float) -> np.ndarray:
    """R_alpha per coordinate; x**2/2 as alpha -> 0, about |x| log(alpha)/alpha as alpha -> inf."""
    t = alpha * np.abs(x)
    return ((1 + t) * np.log1p(t) - t) / alpha**2


def legendre_grad(x: np.ndarray, alpha: float) -> np.ndarray:
    """The mirror map: grad R_alpha(x) = sign(x) log(1 + alpha|x|) / alpha."""
    return np.sign(x) * np.log1p(alpha * np.abs(x)) / alpha


def legendre_grad_inv(u: np.ndarray, alpha: float) -> np.ndarray:
    """The inverse mirror map (grad of the conjugate R*): sign(u) (exp(alpha|u|) - 1) / alpha."""
    return np.sign(u) * np.expm1(alpha * np.abs(u)) / alpha


def bregman_projection(Z: np.ndarray, y: np.ndarray, x0: np.ndarray, alpha: float) -> np.ndarray:
    r"""Solve :math:`\min_{Zx = y} R_\alpha(x) - \langle\nabla R_\alpha(x_0), x\rangle` (float64).

    KKT: :math:`\nabla R_\alpha(x) = \nabla R_\alpha(x_0) + Z^\top\lambda`, so
    :math:`x(\lambda) = (\nabla R_\alpha)^{-1}(u_0 + Z^\top\lambda)`, and :math:`\lambda` minimises
    the smooth convex dual :math:`\sum R^*_\alpha(u_0 + Z^\top\lambda) - \langle\lambda, y\rangle`
    with :math:`R^*_\alpha(u) = (e^{\alpha|u|} - 1 - \alpha|u|)/\alpha^2`, whose gradient is the
    residual :math:`Zx(\lambda) - y`.

    Raises:
        RuntimeError: if the solution is not feasible to 1e-9 (relative to ``|y|``).
    """
    Z, y = np.asarray(Z, dtype=np.float64), np.asarray(y, dtype=np.float64)
    u0 = legendre_grad(np.asarray(x0, dtype=np.float64), alpha)

    def dual(lam):
        t = alpha * np.abs(u0 + Z.T @ lam)
        value = np.sum(np.expm1(t) - t) / alpha**2 - lam @ y
        return value, Z @ legendre_grad_inv(u0 + Z.T @ lam, alpha) - y

    def hess(lam):
        return (Z * np.exp(alpha * np.abs(u0 + Z.T @ lam))) @ Z.T

    with np.errstate(over="ignore", invalid="ignore"):
        sol = scipy.optimize.minimize(dual, np.zeros(len(y)), jac=True, hess=hess,
                                      method="trust-exact", options={"gtol": 1e-12})
        # The dual value stalls in round-off before its gradient does: finish with Newton on
        # the KKT residual, which converges quadratically from there.
        sol = scipy.optimize.root(lambda lam: dual(lam)[1], sol.x, jac=hess, method="hybr",
                                  options={"xtol": 1e-15})
    x = legendre_grad_inv(u0 + Z.T @ sol.x, alpha)
    residual = np.linalg.norm(Z @ x - y)
    if not residual <= 1e-9 * max(1.0, np.linalg.norm(y)):
        raise RuntimeError(f"Bregman projection at alpha={alpha} is infeasible: |Zx - y| = "
                           f"{residual:.3e} > 1e-9 ({sol.message}); check that Z has full row rank")
    return x


@dataclass(frozen=True)
class Trace:
    """Final iterates ``x`` (runs x params); per iteration (steps x runs): the loss, the distance
    to x*, and the distance to each run's reference point (``ref`` of :func:`simulate`)."""

    x: Tensor
    loss: Tensor
    dist: Tensor
    gap: Tensor


def simulate(problem: Problem, runs: Sequence[tuple[float | None, float]], *, steps: int,
             beta: float = 0.0, sign: str = "half_step", tol: float | None = None,
             ref: Tensor | None = None, clamp: float | None = None) -> Trace:
    """Full-batch GD (``alpha=None``) or GD + HAM for each ``(alpha, lr)`` run, side by side.

    The runs are rows of one float64 buffer, so the gradients of all runs are one matmul; each
    run is its own param group of a real ``torch.optim.SGD`` (wrapped in ``sparseham.HAM`` when
    alpha is a number), with the mirror step on the 1-D parameter (``min_ndim=1``) and no norm cap;
    ``clamp`` is HAM's (``None``: its default trust region). ``tol``: stop once every residual is
    below it. ``ref``: one reference point per run (default x*).
    """
    Z, y = problem.Z, problem.y
    X = problem.x0.repeat(len(runs), 1)
    ref = problem.x_star.expand_as(X) if ref is None else ref
    G = torch.zeros_like(X)
    params = [nn.Parameter(row) for row in X]  # views: the optimizers update X in place
    for p, g in zip(params, G):
        p.grad = g
    gd = [{"params": [p], "lr": lr} for p, (a, lr) in zip(params, runs) if a is None]
    hm = [{"params": [p], "lr": lr, "alpha": a} for p, (a, lr) in zip(params, runs) if a is not None]
    opts = [torch.optim.SGD(gd)] if gd else []
    if hm:
        trust = {} if clamp is None else {"clamp": clamp}
        opts.append(sparseham.HAM(torch.optim.SGD(hm), beta=beta, sign=sign, max_norm=None, min_ndim=1,
                                  **trust))
    hist = torch.empty(3, steps + 1, len(runs), dtype=X.dtype)
    for t in range(steps + 1):
        R = X @ Z.T - y
        hist[0, t] = 0.5 * R.square().sum(1)
        hist[1, t] = torch.linalg.vector_norm(X - problem.x_star, dim=1)
        hist[2, t] = torch.linalg.vector_norm(X - ref, dim=1)
        if t == steps or (tol is not None and t % 100 == 0 and bool((R.norm(dim=1) < tol).all())):
            break
        torch.matmul(R, Z, out=G)
        for opt in opts:
            opt.step()
    return Trace(X.clone(), *hist[:, : t + 1])


def _label(alpha: float | None) -> str:
    return "GD" if alpha is None else f"GD+HAM, α={alpha:g}"


def _rows(problem: Problem, trace: Trace, runs, brg: dict[float, np.ndarray]) -> list[dict]:
    Z, y, xs = (t.numpy() for t in (problem.Z, problem.y, problem.x_star))
    entries = [("GD" if a is None else "GD+HAM", a, x.numpy()) for (a, _), x in zip(runs, trace.x)]
    entries += [("Bregman projection", a, x) for a, x in brg.items() if a > 0]
    rows = []
    for method, alpha, x in entries:
        ref = brg[0.0 if alpha is None else alpha]
        rows.append({"method": method, "alpha": "-" if alpha is None else f"{alpha:g}",
                     "dist_to_x_star": np.linalg.norm(x - xs), "l1": np.abs(x).sum(),
                     "residual": np.linalg.norm(Z @ x - y), "gap_to_bregman": np.linalg.norm(x - ref)})
    return rows


def _plot(trace: Trace, runs, brg: dict[float, np.ndarray], x_star: np.ndarray, lr: float) -> Figure:
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    it = np.arange(1, len(trace.loss) + 1)
    for j, (alpha, _) in enumerate(runs):
        style = {"color": "black", "lw": 3.5, "alpha": 0.35} if alpha is None else {
            "color": f"C{ALPHAS.index(alpha)}", "lw": 1.6}
        left.plot(it, trace.dist[:, j].numpy(), label=_label(alpha), **style)
        target = np.linalg.norm(brg[0.0 if alpha is None else alpha] - x_star)
        left.axhline(target, ls="--", lw=1, color=style["color"])
        right.plot(it, trace.gap[:, j].numpy(), label=_label(alpha), **style)
    left.plot([], [], color="gray", ls="--", lw=1, label="its Bregman projection")
    left.set(xscale="log", yscale="log", xlabel="iteration k + 1", ylabel=r"$\|x_k - x^*\|_2$",
             title="distance to the 5-sparse ground truth")
    right.set(xscale="log", yscale="log", xlabel="iteration k + 1",
              ylabel=r"$\|x_k - x_{\mathrm{Breg}}(\alpha)\|_2$",
              title="distance to the Bregman projection (GD: Euclidean)")
    left.legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Least squares, 100 params, 40 samples, x0 = {X0_SCALE:g}·1, β = 0, η = {lr:g}")
    return fig


def _write(out: Path, rows: list[dict], fig: Figure, header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "linreg.png", dpi=120)
    with open(out / "linreg.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: v if isinstance(v, str) else f"{v:.6g}" for k, v in r.items()} for r in rows)
    lines = [header, "", "| method | α | ‖x − x*‖₂ | ‖x‖₁ | ‖Zx − y‖ | ‖x − x_breg‖ |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['alpha']} | {r['dist_to_x_star']:.4f} | {r['l1']:.4f} | "
              f"{r['residual']:.2e} | {r['gap_to_bregman']:.2e} |" for r in rows]
    (out / "linreg.md").write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sparseham.analysis.linreg",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/linreg"),
                        help="output directory (default: benchmarks/results/linreg)")
    parser.add_argument("--steps", type=int, default=20000,
                        help="most GD / GD+HAM iterations; all runs stop once every residual < 1e-10")
    parser.add_argument("--lr", type=float, default=0.005,
                        help="step size η for every run (α = 100 diverges at 0.01 on seed 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the problem")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny matrices: thread hand-offs cost more than they save
    problem = make_problem(seed=args.seed)
    runs = [(None, args.lr)] + [(a, args.lr) for a in ALPHAS]
    Z, y, x0 = (t.numpy() for t in (problem.Z, problem.y, problem.x0))
    # alpha -> 0 is the Euclidean projection of x0, the limit of GD.
    brg = {0.0: x0 + np.linalg.lstsq(Z, y - Z @ x0, rcond=None)[0]}
    brg |= {a: bregman_projection(Z, y, x0, a) for a in ALPHAS}
    ref = torch.from_numpy(np.stack([brg[0.0 if a is None else a] for a, _ in runs]))
    trace = simulate(problem, runs, steps=args.steps, tol=1e-10, ref=ref, clamp=50.0)  # the unclamped step
    rows = _rows(problem, trace, runs, brg)
    header = (f"# GD + HAM on least squares (seed {args.seed}, η={args.lr:g}, "
              f"{len(trace.loss) - 1} steps, x0 = {X0_SCALE:g}·1, β = 0)\n\n"
              "GD's gap is to the Euclidean projection of x0 (the α → 0 limit).")
    _write(args.out, rows, _plot(trace, runs, brg, problem.x_star.numpy(), args.lr), header)
    print((args.out / "linreg.md").read_text())


if __name__ == "__main__":
    main()
