"""The fused mirror step: one compiled pass per tensor (torch.compile; Triton on CUDA).

``torch.compile`` caches one graph per parameter layout (number, shapes, dtypes and devices of
the tensors). ``lr``, ``alpha`` and ``beta`` are traced as symbolic floats, so a learning-rate
schedule does not recompile.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fused_ham"]


def _ham_pass(params, grads, signs, lr: float, alpha: float, beta: float, clamp: float, max_norm):
    for p, g, s in zip(params, grads, signs):
        e = torch.nan_to_num(torch.sign(s) * g * (-lr * alpha) - lr * beta, nan=0.0)
        new = p * torch.exp(torch.clamp(e, -clamp, clamp))
        if max_norm is not None:
            new = new * torch.clamp(max_norm / torch.linalg.vector_norm(new), max=1.0)
        p.copy_(new)


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
        _compiled = torch.compile(_ham_pass, fullgraph=True, dynamic=False)
    _compiled(params, grads, signs, lr, float(alpha), float(beta), float(clamp), max_norm)
