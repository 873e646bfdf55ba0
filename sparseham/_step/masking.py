"""The masking stages of the step: gradients (stage 2), weights and optimizer state (stage 4).

The staged pipeline runs these over lists with ``torch._foreach_mul_``; the one-pass step does the
same multiplications per tensor inside its pass (:func:`masked`). Optimizer state is masked by
shape, never by optimizer type: every state tensor shaped like its weight (momentum, ``exp_avg``,
``exp_avg_sq``, ...) is multiplied by the weight's mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["factors", "mask_grads_", "mask_weights_", "masked", "reset_state_", "state_like", "zero_state_"]


def factors(masks: Sequence[Tensor], params: Sequence[Tensor]) -> list[Tensor]:
    """What the masks multiply by. On CPU, multiplying floats by a bool tensor first converts the
    bool tensor (about as slow as an SGD step over the weights): a float copy there. On
    accelerators the conversion happens inside the kernel, so the 1-byte masks serve."""
    return [m.to(p.dtype) if p.device.type == "cpu" else m for m, p in zip(masks, params)]


def masked(t: Tensor, mask: Tensor) -> Tensor:
    """``t`` with its pruned entries zeroed, for one tensor inside a compiled pass (``mask``: a
    uint8 view of the bool mask, which inductor vectorizes)."""
    return t * mask.to(t.dtype)


def state_like(p: Tensor, state: Mapping[Tensor, dict[str, Any]]) -> list[Tensor]:
    """The optimizer-state tensors of ``p`` shaped like ``p`` (the ones a mask applies to)."""
    return [v for v in state.get(p, {}).values() if isinstance(v, Tensor) and v.shape == p.shape]


def mask_grads_(params: Sequence[Tensor], factors: Sequence[Tensor]) -> None:
    """Stage 2: zero the gradients of pruned weights, in place."""
    pairs = [(p.grad, m) for p, m in zip(params, factors) if p.grad is not None]
    if pairs:
        grads, masks = zip(*pairs)
        torch._foreach_mul_(list(grads), list(masks))


@torch.no_grad()
def mask_weights_(params: Sequence[Tensor], factors: Sequence[Tensor],
                  state: Mapping[Tensor, dict[str, Any]]) -> None:
    """Stage 4: zero pruned weights and their entries of every optimizer-state tensor, in place."""
    tensors, masks = list(params), list(factors)
    for p, m in zip(params, factors):
        for value in state_like(p, state):
            tensors.append(value)
            masks.append(m)
    torch._foreach_mul_(tensors, masks)


def zero_state_(params: Sequence[Tensor], where: Sequence[Tensor],
                state: Mapping[Tensor, dict[str, Any]]) -> None:
    """Zero the optimizer-state entries at ``where`` (per tensor a bool mask or flat indices)."""
    for p, w in zip(params, where):
        for value in state_like(p, state):
            if w.dtype == torch.bool:
                value.masked_fill_(w, 0)
            else:
                value.view(-1).index_fill_(0, w, 0)


@torch.no_grad()
def reset_state_(param_groups: Sequence[dict[str, Any]], state: Mapping[Tensor, dict[str, Any]]) -> None:
    """Zero every optimizer-state tensor shaped like its parameter, for every parameter of
    ``param_groups`` (managed or not); step counters stay."""
    for group in param_groups:
        for p in group["params"]:
            for value in state_like(p, state):
                value.zero_()
