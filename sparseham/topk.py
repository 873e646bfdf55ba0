"""Exact top-k masks without a full sort.

Every mask in sparseham keeps exactly ``k`` entries. The threshold is found by selection
(``torch.kthvalue``, O(n)), and ties at the threshold are broken towards the lower flat index with
a cumulative sum, so the result is deterministic on every process and device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import sharding

__all__ = ["topk_mask", "global_topk_masks", "nm_mask", "nm_groups", "nm_kept"]


def topk_mask(scores: Tensor, k: int | Tensor) -> Tensor:
    """Bool mask, shaped like ``scores``, of its ``k`` largest entries.

    NaN scores rank below every number. Ties at the threshold go to the lower flat index, so
    exactly ``k`` entries are set whatever the ties. No host synchronisation when ``k`` is an int.
    A sharded ``scores`` (FSDP2) gets the same mask as its shards (:mod:`sparseham.sharding`).
    """
    if sharding.is_sharded(scores):
        return sharding.topk_mask(scores, k)
    flat = scores.reshape(-1)
    n = flat.numel()
    if isinstance(k, int):
        if k <= 0:
            return torch.zeros_like(scores, dtype=torch.bool)
        if k >= n:
            return torch.ones_like(scores, dtype=torch.bool)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # kthvalue needs a full-precision float; float64 keeps tiny/huge scores apart
    flat = torch.nan_to_num(flat, nan=-torch.inf)
    # The k-th largest is the (n - k + 1)-th smallest.
    threshold = torch.kthvalue(flat, n - k + 1).values
    above = flat > threshold
    ties = flat == threshold
    need = k - above.sum(dtype=torch.int32)
    keep = above | (ties & (ties.cumsum(0, dtype=torch.int32) <= need))
    return keep.view(scores.shape)


def global_topk_masks(scores: Sequence[Tensor], k: int) -> list[Tensor]:
    """Masks of the ``k`` largest entries over all tensors together (one global threshold)."""
    if any(sharding.is_sharded(s) for s in scores):
        return sharding.global_topk_masks(scores, k)
    flat = torch.cat([s.reshape(-1) for s in scores])
    keep = topk_mask(flat, k)
    return [m.view(s.shape) for m, s in zip(keep.split([s.numel() for s in scores]), scores)]


def nm_groups(shape: Sequence[int], m: int) -> bool:
    """Whether a weight of ``shape`` splits into groups of ``m`` consecutive inputs: its fan-in
    (everything but the output dimension, a kernel flattened as in im2col) is a multiple of ``m``."""
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 0
    return fan_in > 0 and fan_in % m == 0


def nm_kept(shape: Sequence[int], n: int, m: int) -> int:
    """Weights an N:M pattern keeps in a tensor of ``shape`` (all of them if it has no groups)."""
    size = math.prod(shape)
    return size * n // m if nm_groups(shape, m) else size


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Bool mask keeping the ``n`` highest of every ``m`` consecutive inputs of each output (N:M).

    A tensor that does not split into such groups (:func:`nm_groups`) is kept whole. Exactly ``n``
    of every group are kept whatever the ties; no host synchronisation.
    """
    if sharding.is_sharded(scores):
        return sharding.nm_mask(scores, n, m)
    if not nm_groups(scores.shape, m):
        return torch.ones_like(scores, dtype=torch.bool)
    groups = torch.nan_to_num(scores.float(), nan=-torch.inf).reshape(scores.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, torch.topk(groups, n, dim=-1, sorted=False).indices, True)
    return keep.view(scores.shape)
