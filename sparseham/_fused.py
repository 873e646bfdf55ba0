"""The fused mirror step: one compiled pass per tensor (torch.compile; Triton on CUDA).

``torch.compile`` caches one graph per parameter layout (number, shapes, dtypes and devices of
the tensors). ``dynamic=None`` lets the second distinct ``lr`` recompile once with ``lr``,
``alpha`` and ``beta`` as symbolic floats; after that a learning-rate schedule does not recompile.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["fused_ham"]


def _ham_pass(params, grads, signs, lr: float, alpha: float, beta: float, clamp: float, max_norm):
    for p, g, s in zip(params, grads, signs):
        e = torch.sign(s) * g * (-lr * alpha) - lr * beta
        # NaN -> 0 (the clamp handles +-inf); a where() compiles to a vector select, nan_to_num
        # to a scalar loop.
        e = torch.where(e == e, e, 0.0)
        p.mul_(torch.exp(torch.clamp(e, -clamp, clamp)))
        if max_norm is not None:
            # A separate in-place pass: computing the norm of the product before writing it back
            # makes the compiled kernel materialise a full-size temporary.
            p.mul_(_cap(max_norm, p))


def _cap(max_norm: float, p: torch.Tensor) -> torch.Tensor:
    """Factor that brings ``p``'s norm down to ``max_norm`` (see ``sparseham.ham.cap_norms_``)."""
    norm = torch.linalg.vector_norm(p)
    bound = torch.where(torch.isfinite(norm), norm, p.abs().amax() * math.sqrt(p.numel()))
    return torch.where(torch.isfinite(bound), torch.clamp(max_norm / bound, max=1.0), 1.0)


_compiled = None


def fused_ham(
    params: list[Tensor],
    grads: list[Tensor],
    signs: list[Tensor],
    *,
    lr: float | Tensor,
    alpha: float,
    beta: float,
    clamp: float,
    max_norm: float | None,
) -> None:
    """Apply the mirror step to every tensor in one compiled call (see ``sparseham.ham``)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_ham_pass, fullgraph=True, dynamic=None)
    _compiled(params, grads, signs, lr, float(alpha), float(beta), float(clamp), max_norm)
