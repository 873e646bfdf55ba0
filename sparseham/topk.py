"""Exact top-k masks without a full sort.

Every mask in sparseham keeps exactly ``k`` entries. The threshold is found by selection
(``torch.kthvalue``, O(n)), and ties at the threshold are broken towards the lower flat index with
a cumulative sum, so the result is deterministic on every process and device.

Over FSDP2 shards (``DTensor``) the same masks come out, as shards: each rank takes its local
top-``min(k, n_local)`` candidates (the same value-then-lower-flat-index order), only those are
all-gathered, and every rank picks the same global k-th (value, flat index) pair; each then keeps
its own entries above it. The result equals the single-process mask bit for bit, with exactly
``k`` entries, and no rank ever holds a full weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import sharding

__all__ = ["topk_mask", "global_topk_masks", "nm_mask", "nm_groups", "nm_kept"]


def topk_mask(scores: Tensor, k: int | Tensor) -> Tensor:
    """Bool mask, shaped like ``scores``, of its ``k`` largest entries.

    NaN scores rank below every number. Ties at the threshold go to the lower flat index, so
    exactly ``k`` entries are set whatever the ties. No host synchronisation when ``k`` is an int.
    A sharded ``scores`` (FSDP2) gets the same mask as its shards (see the module docstring).
    """
    if sharding.is_sharded(scores):
        return _sharded_topk_mask(scores, k)
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
        return _sharded_global_topk_masks(scores, k)
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
        return _sharded_nm_mask(scores, n, m)
    if not nm_groups(scores.shape, m):
        return torch.ones_like(scores, dtype=torch.bool)
    groups = torch.nan_to_num(scores.float(), nan=-torch.inf).reshape(scores.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, torch.topk(groups, n, dim=-1, sorted=False).indices, True)
    return keep.view(scores.shape)


# -- sharded tensors (FSDP2) -------------------------------------------------------------------
def _prepare(local: Tensor) -> Tensor:
    flat = local.reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    return torch.nan_to_num(flat, nan=-torch.inf)


def _kth(flats: Sequence[Tensor], starts: Sequence[int], k: int, group) -> tuple[Tensor, Tensor]:
    """The global k-th largest (value, flat index) over every rank's ``flats`` (lexicographic:
    higher value first, then lower index), from each rank's local top-k candidates only."""
    flat = torch.cat(list(flats)) if len(flats) > 1 else flats[0]
    take = min(k, flat.numel())
    chosen = topk_mask(flat, take) if take else torch.zeros_like(flat, dtype=torch.bool)
    # Flat indices of the candidates only (no index per weight): their position in the local
    # concatenation, moved to each piece's place in the whole.
    position = chosen.nonzero().flatten()
    ends = torch.tensor([f.numel() for f in flats], device=flat.device).cumsum(0)
    piece = torch.searchsorted(ends, position, right=True)
    shift = torch.tensor(starts, device=flat.device) - torch.cat([ends.new_zeros(1), ends[:-1]])
    values, where = flat[chosen].double(), position + shift[piece]
    size = torch.tensor([take], device=flat.device)
    dist.all_reduce(size, op=dist.ReduceOp.MAX, group=group)
    pad = int(size) - take  # pads rank last: -inf and indices past every real one
    values = torch.cat([values, values.new_full((pad,), -torch.inf)])
    where = torch.cat([where, torch.arange(pad, device=flat.device) + torch.iinfo(torch.int64).max // 2])
    world = dist.get_world_size(group)
    all_values = values.new_empty(world * values.numel())
    all_where = where.new_empty(world * where.numel())
    dist.all_gather_single(all_values, values, group=group)
    dist.all_gather_single(all_where, where, group=group)
    order = torch.sort(all_where, stable=True).indices  # lower index first among equal values
    order = order[torch.sort(all_values[order], descending=True, stable=True).indices]
    return all_values[order[k - 1]], all_where[order[k - 1]]


def _keep(flat: Tensor, start: int, value: Tensor, where: Tensor) -> Tensor:
    """Entries above the k-th (value, index) pair: larger values, and equal ones at a flat index
    up to ``where`` (candidate values are this dtype's own, so the comparison is exact)."""
    value = value.to(flat.dtype)
    keep = flat > value
    ties = flat == value
    ties[max(0, int(where) - start + 1):] = False  # one host read, at a mask update only
    return keep | ties


def _sharded_topk_mask(scores: Tensor, k: int) -> Tensor:
    """:func:`topk_mask` of a sharded ``scores``: the same mask, as its shards."""
    if isinstance(k, Tensor):
        k = int(k)
    n, local = scores.numel(), scores.to_local()
    if k <= 0 or k >= n:
        return sharding.wrap(torch.full(local.shape, k > 0, dtype=torch.bool, device=local.device), scores)
    start, _ = sharding.flat_offset(scores)
    flat = _prepare(local)
    value, where = _kth([flat], [start], k, scores.device_mesh.get_group())
    return sharding.wrap(_keep(flat, start, value, where).view(local.shape), scores)


def _sharded_global_topk_masks(scores: Sequence[Tensor], k: int) -> list[Tensor]:
    """:func:`global_topk_masks` of sharded tensors: flat indices run through the
    tensors in order, as in the concatenation the single-process version ranks."""
    flats, starts, base = [], [], 0
    for s in scores:
        start, _ = sharding.flat_offset(s)
        flats.append(_prepare(s.to_local()))
        starts.append(base + start)
        base += s.numel()
    total = base
    if k <= 0 or k >= total:
        return [sharding.wrap(torch.full(s.to_local().shape, k > 0, dtype=torch.bool, device=f.device), s)
                for s, f in zip(scores, flats)]
    value, where = _kth(flats, starts, k, scores[0].device_mesh.get_group())
    return [sharding.wrap(_keep(f, st, value, where).view(s.to_local().shape), s)
            for f, st, s in zip(flats, starts, scores)]


def _sharded_nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """:func:`nm_mask` of a row-sharded ``scores``: groups lie within a row, so each
    rank masks its own rows."""
    local = scores.to_local()
    if not nm_groups(scores.shape, m):
        return sharding.wrap(torch.ones_like(local, dtype=torch.bool), scores)
    if local.numel() == 0:
        return sharding.wrap(torch.zeros_like(local, dtype=torch.bool), scores)
    return sharding.wrap(nm_mask(local, n, m), scores)
