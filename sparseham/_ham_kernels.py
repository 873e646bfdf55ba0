"""The kernels of the mirror step: a for-loop, a foreach and a fused (compiled) implementation.

Each kernel updates the parameters in place and returns, per tensor, two device tensors for the
diagnostics: how many entries' exponents reached the clamp (with ``count``; else ``[]``), and
whether the norm cap rescaled it (0 or 1). Nothing here reads a device value on the host.

The fused kernel is one compiled pass per tensor (torch.compile; Triton on CUDA).
``torch.compile`` caches one graph per parameter layout (number, shapes, dtypes and devices of
the tensors). ``dynamic=None`` lets the second distinct ``lr`` recompile once with ``lr``,
``alpha`` and ``beta`` as symbolic floats; after that a learning-rate schedule does not recompile.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["cap_norms_"]

Counts = tuple[list[Tensor], list[Tensor]]  # (clamped entries, capped flag) per tensor


def _ham_pass(params, grads, signs, lr: float, alpha: float, beta: float, clamp: float,
              count: bool) -> list[Tensor]:
    hits = []
    for p, g, s in zip(params, grads, signs):
        e = torch.sign(s) * g * (-lr * alpha) - lr * beta
        # NaN -> 0 (the clamp handles +-inf); a where() compiles to a vector select, nan_to_num
        # to a scalar loop.
        e = torch.where(e == e, e, 0.0)
        if count:
            hits.append((e.abs() >= clamp).sum())  # a reduction in the same loop as the update
        p.mul_(torch.exp(torch.clamp(e, -clamp, clamp)))
    return hits


_compiled = None


def _fused_ham(params, grads, signs, *, lr, alpha, beta, clamp, max_norm, count=True) -> Counts:
    """Apply the mirror step to every tensor in one compiled call (see ``sparseham.ham``).

    The norm cap runs after it as the eager foreach ``cap_norms_``: compiled into the same graph,
    inductor's CPU code for the two reductions cost about 4x an SGD step, the eager version 0.6x.
    """
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_ham_pass, fullgraph=True, dynamic=None)
    hits = _compiled(params, grads, signs, lr, float(alpha), float(beta), float(clamp), count)
    return list(hits), _cap_grouped(params, max_norm)


def _single_tensor_ham(params, grads, signs, *, lr, alpha, beta, clamp, max_norm, count=True) -> Counts:
    hits = []
    for p, g, s in zip(params, grads, signs):
        e = torch.sign(s).mul_(g).mul_(-lr * alpha)
        if beta != 0:
            e.sub_(lr * beta)
        # NaN (from a NaN gradient, or 0 * inf) means "no information": factor 1.
        e.nan_to_num_(nan=0.0).clamp_(-clamp, clamp)
        if count:
            hits.append(torch.count_nonzero(e.abs() >= clamp))
        p.mul_(e.exp_())
    capped = [c for p in params for c in cap_norms_([p], max_norm)] if max_norm is not None else []
    return hits, capped


def _multi_tensor_ham(params, grads, signs, *, lr, alpha, beta, clamp, max_norm, count=True) -> Counts:
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, signs])
    order = {id(p): i for i, p in enumerate(params)}
    hits: list[Tensor | None] = [None] * len(params)
    for (dev_params, dev_grads, dev_signs), _ in grouped.values():
        e = torch._foreach_sign(dev_signs)
        torch._foreach_mul_(e, dev_grads)
        torch._foreach_mul_(e, -lr * alpha)
        if beta != 0:
            torch._foreach_add_(e, -lr * beta)
        for p, t in zip(dev_params, e):  # no foreach nan_to_num; one fused clamp per tensor in the loop
            t.nan_to_num_(nan=0.0).clamp_(-clamp, clamp)
            if count:
                hits[order[id(p)]] = torch.count_nonzero(t.abs() >= clamp)
        torch._foreach_exp_(e)
        torch._foreach_mul_(dev_params, e)
    return (hits if count else []), _cap_grouped(params, max_norm)


def _cap_grouped(params: list[Tensor], max_norm: float | None) -> list[Tensor]:
    """:func:`cap_norms_` per device and dtype; the capped flags in the order of ``params``."""
    if max_norm is None:
        return []
    order = {id(p): i for i, p in enumerate(params)}
    capped: list[Tensor | None] = [None] * len(params)
    for (group,), _ in Optimizer._group_tensors_by_device_and_dtype([params]).values():
        for p, flag in zip(group, cap_norms_(group, max_norm)):
            capped[order[id(p)]] = flag
    return capped


def cap_norms_(tensors: list[Tensor], max_norm: float) -> list[Tensor]:
    """Rescale, in place and on the device, every tensor whose L2 norm exceeds ``max_norm``.

    Returns:
        Per tensor, a 0-dim int64 device tensor: 1 where it was rescaled, else 0.
    """
    norms = torch.stack(torch._foreach_norm(tensors))
    # Squares overflow float32 once entries pass ~1.8e19 and the norm becomes inf; max|t| * sqrt(n)
    # bounds the norm and still caps then (a float64 norm would do too, at ~7x the cost on CPU).
    peaks = torch.stack([torch.maximum(-lo, hi) * math.sqrt(t.numel()) for t in tensors for lo, hi in
                         [torch.aminmax(t)]])
    bound = torch.where(torch.isfinite(norms), norms, peaks)
    # A NaN or inf entry makes the bound non-finite: leave that tensor alone rather than spread it.
    scale = torch.where(torch.isfinite(bound), torch.clamp(max_norm / bound, max=1.0), 1.0)
    torch._foreach_mul_(tensors, list(scale.to(tensors[0].dtype).unbind()))
    return list((scale < 1.0).long().unbind())
