"""Masks over FSDP2-sharded weights: the one home of what sparseham does with a ``DTensor``.

Under ``fully_shard`` every managed weight is a ``DTensor`` split along dim 0 (``Shard(0)``,
rows as ``torch.chunk`` splits them; a rank may hold no rows). Element-wise steps need nothing
from here: masking, HAM's mirror step and the sign-flip tracker run on each rank's shard through
``DTensor``, and reductions (kept counts, flips) stay ``Partial`` until read. What does need
communication is choosing exactly ``k`` of a sharded tensor:

- :func:`topk_mask` / :func:`global_topk_masks`: each rank takes its local top-``min(k, n_local)``
  candidates (the same value-then-lower-flat-index order as :mod:`sparseham.topk`), only those are
  all-gathered, and every rank picks the same global k-th (value, flat index) pair; each then keeps
  its own entries above it. The result equals the single-process mask bit for bit, with exactly
  ``k`` entries, and no rank ever holds a full weight.
- :func:`local_slice`: a mask or score built whole on every rank (random scores come from a
  generator seeded alike on every rank) becomes this rank's shard, with no communication.
- :func:`full`: the whole tensor, gathered (checkpoints only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # a torch without DTensor: nothing is ever sharded
    DTensor = ()  # type: ignore[assignment,misc]

__all__ = ["is_sharded", "local", "wrap", "local_slice", "full", "full_tree",
           "shard_model_state", "shard_optimizer_state", "stack_counts", "sum_over_ranks", "topk_mask",
           "global_topk_masks", "nm_mask"]


def is_sharded(t: object) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2 parameter, its gradient, state or mask)."""
    return isinstance(t, DTensor)


def _offset(like: Tensor) -> tuple[int, tuple[int, ...]]:
    """Flat index of this rank's first entry in the whole tensor, and the local shape."""
    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    strides = [math.prod(like.shape[i + 1:]) for i in range(len(like.shape))]
    return sum(o * s for o, s in zip(offset, strides)), tuple(shape)


def local(t: Tensor) -> Tensor:
    """This rank's shard of ``t`` (a view), or ``t`` itself when it is not sharded."""
    return t.to_local() if is_sharded(t) else t


def wrap(local: Tensor, like: Tensor) -> Tensor:
    """``local`` (this rank's part, shaped like ``like``'s shard) as a sharded tensor like ``like``."""
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def local_slice(whole: Tensor, like: Tensor) -> Tensor:
    """``whole`` (shaped like the sharded ``like``, the same on every rank) as ``like``'s shards."""
    if not is_sharded(like) or is_sharded(whole):
        return whole
    start, shape = _offset(like)
    n = math.prod(shape)
    piece = whole.reshape(-1)[start:start + n].view(shape).to(like.to_local().device)
    return wrap(piece, like)


def full(t: Tensor) -> Tensor:
    """The whole tensor (an all-gather when sharded): for checkpoints, never per step."""
    return t.full_tensor() if is_sharded(t) else t


def full_tree(obj):
    """``obj`` (nested dicts, lists, tuples) with every sharded tensor gathered whole: a
    checkpoint's full state dicts. A collective: every rank calls it, in the same order."""
    if is_sharded(obj):
        return obj.full_tensor()
    if isinstance(obj, dict):
        return {k: full_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_tree(v) for v in obj)
    return obj


def shard_model_state(saved: dict, model) -> dict:
    """A full model state dict as the shards of ``model``'s own (sharded) entries."""
    current = model.state_dict()
    return {k: local_slice(v, current[k]) if k in current else v for k, v in saved.items()}


def shard_optimizer_state(saved: dict, optimizer) -> dict:
    """A full optimizer state dict with each state tensor shaped like its parameter turned into
    that parameter's shards (state is keyed by the parameters' order over the param groups)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entry in saved["state"].items():
        p = params[index]
        state[index] = {k: local_slice(v, p) if torch.is_tensor(v) and v.shape == p.shape else v
                        for k, v in entry.items()}
    return {**saved, "state": state}


def stack_counts(counts: Sequence[Tensor]) -> Tensor:
    """``torch.stack`` of per-layer reductions (``count_nonzero``, ``sum``); reductions of shards
    are partial sums, added over ranks here in one all-reduce (a collective: every rank calls it)."""
    if not any(is_sharded(c) for c in counts):
        return torch.stack(list(counts))
    sharded = next(c for c in counts if is_sharded(c))
    return sum_over_ranks(torch.stack([c.to_local() if is_sharded(c) else c for c in counts]), sharded)


def sum_over_ranks(t: Tensor, like: Tensor) -> Tensor:
    """A copy of ``t`` summed over the ranks that shard ``like`` (a collective)."""
    t = t.clone()
    dist.all_reduce(t, group=like.device_mesh.get_group())
    return t


def _prepare(local: Tensor) -> Tensor:
    flat = local.reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    return torch.nan_to_num(flat, nan=-torch.inf)


def _kth(flats: Sequence[Tensor], starts: Sequence[int], k: int, group) -> tuple[Tensor, Tensor]:
    """The global k-th largest (value, flat index) over every rank's ``flats`` (lexicographic:
    higher value first, then lower index), from each rank's local top-k candidates only."""
    from sparseham.topk import topk_mask as local_topk

    flat = torch.cat(list(flats)) if len(flats) > 1 else flats[0]
    take = min(k, flat.numel())
    chosen = local_topk(flat, take) if take else torch.zeros_like(flat, dtype=torch.bool)
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


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """:func:`sparseham.topk.topk_mask` of a sharded ``scores``: the same mask, as its shards."""
    if isinstance(k, Tensor):
        k = int(k)
    n, local = scores.numel(), scores.to_local()
    if k <= 0 or k >= n:
        return wrap(torch.full(local.shape, k > 0, dtype=torch.bool, device=local.device), scores)
    start, _ = _offset(scores)
    flat = _prepare(local)
    value, where = _kth([flat], [start], k, scores.device_mesh.get_group())
    return wrap(_keep(flat, start, value, where).view(local.shape), scores)


def global_topk_masks(scores: Sequence[Tensor], k: int) -> list[Tensor]:
    """:func:`sparseham.topk.global_topk_masks` of sharded tensors: flat indices run through the
    tensors in order, as in the concatenation the single-process version ranks."""
    flats, starts, base = [], [], 0
    for s in scores:
        start, _ = _offset(s)
        flats.append(_prepare(s.to_local()))
        starts.append(base + start)
        base += s.numel()
    total = base
    if k <= 0 or k >= total:
        return [wrap(torch.full(s.to_local().shape, k > 0, dtype=torch.bool, device=f.device), s)
                for s, f in zip(scores, flats)]
    value, where = _kth(flats, starts, k, scores[0].device_mesh.get_group())
    return [wrap(_keep(f, st, value, where).view(s.to_local().shape), s)
            for f, st, s in zip(flats, starts, scores)]


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """:func:`sparseham.topk.nm_mask` of a row-sharded ``scores``: groups lie within a row, so each
    rank masks its own rows."""
    from sparseham.topk import nm_groups
    from sparseham.topk import nm_mask as local_nm

    local = scores.to_local()
    if not nm_groups(scores.shape, m):
        return wrap(torch.ones_like(local, dtype=torch.bool), scores)
    if local.numel() == 0:
        return wrap(torch.zeros_like(local, dtype=torch.bool), scores)
    return wrap(local_nm(local, n, m), scores)
