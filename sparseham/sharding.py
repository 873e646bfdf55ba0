"""Masks over FSDP2-sharded weights: the one home of what sparseham does with a ``DTensor``.

Under ``fully_shard`` every managed weight is a ``DTensor`` split along dim 0 (``Shard(0)``,
rows as ``torch.chunk`` splits them; a rank may hold no rows). Element-wise steps need nothing
from here: masking, HAM's mirror step and the sign-flip tracker run on each rank's shard through
``DTensor``, and reductions (kept counts, flips) stay ``Partial`` until read. What does need
communication is choosing exactly ``k`` of a sharded tensor, and the checkpoint's gathering and
re-sharding (``sparseham.train.checkpoint``); the sharded top-k lives with the other top-k
helpers, in :mod:`sparseham.topk`. Here:

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

__all__ = ["flat_offset", "full", "is_sharded", "local", "local_slice", "stack_counts", "sum_over_ranks",
           "wrap"]


def is_sharded(t: object) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2 parameter, its gradient, state or mask)."""
    return isinstance(t, DTensor)


def flat_offset(like: Tensor) -> tuple[int, tuple[int, ...]]:
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
    start, shape = flat_offset(like)
    n = math.prod(shape)
    piece = whole.reshape(-1)[start:start + n].view(shape).to(like.to_local().device)
    return wrap(piece, like)


def full(t: Tensor) -> Tensor:
    """The whole tensor (an all-gather when sharded): for checkpoints, never per step."""
    return t.full_tensor() if is_sharded(t) else t


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
