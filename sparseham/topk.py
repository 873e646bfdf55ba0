"""Exact top-k masks without a full sort.

Every mask in sparseham keeps exactly ``k`` entries, and ties at the threshold go to the lower flat
index, so the result is deterministic on every process and device. The threshold is the exact
k-th largest value, found by selection (``torch.kthvalue``, O(n)):

- on the CPU, where reading a count on the host costs nothing, selection runs only over a band
  of candidates around the threshold, bracketed by a strided sample (a few percent of the
  entries, not all: kthvalue copies its input and adds an int64 index per entry), and ties are
  broken only when there are more of them than places left, with ``nonzero`` on the tie mask of
  one chunk (issue 35);
- elsewhere (CUDA), with no host read: ``kthvalue`` over all entries, and ties broken with a
  cumulative sum over the tie mask.

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

__all__ = ["topk_mask", "topk_magnitude_mask", "global_topk_masks", "nm_mask", "nm_groups", "nm_kept"]


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
    if flat.device.type == "cpu":
        return _host_topk(flat, int(k)).view(scores.shape)
    flat = torch.nan_to_num(flat, nan=-torch.inf)
    # The k-th largest is the (n - k + 1)-th smallest.
    threshold = torch.kthvalue(flat, n - k + 1).values
    above = flat > threshold
    ties = flat == threshold
    need = k - above.sum(dtype=torch.int32)
    keep = above | (ties & (ties.cumsum(0, dtype=torch.int32) <= need))
    return keep.view(scores.shape)


_SAMPLE = 2**14  # entries of the strided sample that brackets the threshold
_CHUNK = 2**18  # entries per chunk where scores are made chunk by chunk


def _host_topk(flat: Tensor, k: int) -> Tensor:
    """:func:`topk_mask` of a 1-D float tensor on the CPU, with host reads (see the module docstring)."""
    n = flat.numel()
    if k <= 0 or k >= n:
        return torch.full_like(flat, k > 0, dtype=torch.bool)
    keep = _select(n, lambda a, b, step=1: flat[a:b:step], k, _CHUNK)
    if keep is not None:
        return keep
    # A threshold among NaN or at an infinity: map as the device path does (NaN to -inf, +-inf to
    # the largest finite values), in a copy, so every device ranks alike.
    mapped = torch.nan_to_num(flat, nan=-torch.inf)
    return _select(n, lambda a, b, step=1: mapped[a:b:step], k, _CHUNK, exact=True)


def topk_magnitude_mask(values: Tensor, k: int | Tensor, among: Tensor) -> Tensor:
    """``topk_mask(values.abs().masked_fill(~among, -inf), k)``: the ``k`` entries of largest
    magnitude where the bool ``among`` is set, the same mask bit for bit.

    On the CPU the scores are made chunk by chunk (2^18 entries) and never held whole: the mask,
    the band of candidates and one chunk are the extra memory (RigL's drop step on the largest
    layer, issue 35). Elsewhere, and for sharded, NaN or non-float32/64 ``values``, the expression
    above.
    """
    n = values.numel()
    if sharding.is_sharded(values) or values.device.type != "cpu" or not 0 < int(k) < n \
            or values.dtype not in (torch.float32, torch.float64):
        return topk_mask(values.abs().masked_fill(~among, -torch.inf), k)
    k = int(k)
    v, m = values.reshape(-1), among.reshape(-1)
    low = torch.tensor(-torch.inf, dtype=values.dtype)

    def score(a: int, b: int, step: int = 1) -> Tensor:
        return torch.where(m[a:b:step], v[a:b:step].abs(), low)  # masked_fill_ is 3x slower here

    keep = _select(n, score, k, _CHUNK)
    if keep is None:  # the threshold is among NaN or at an infinity: rank as the device path does
        return topk_mask(values.abs().masked_fill(~among, -torch.inf), k)
    return keep.view(values.shape)


def _select(n: int, score, k: int, chunk: int, exact: bool = False) -> Tensor | None:
    """The mask of the ``k`` largest of ``n`` scores, ties to the lower flat index; ``score(a, b,
    step)`` gives entries ``a, a + step, ... < b``. ``None`` where the threshold is infinite or the
    largest finite value (there the device path's mapping of infinities could tie other entries),
    or falls among NaN, unless ``exact`` (the scores are mapped already). A NaN compares false:
    it is in neither the mask nor the band, so it ranks last, as mapped to -inf, as long as ``k``
    numbers are there; otherwise the fallback sees it.

    One pass over the scores: the entries above a band ``[lo, hi]`` go into the mask at once, the
    band's entries and positions are kept; the k-th largest is selected in the band, and the band's
    entries above it join the mask, and of those equal to it the first that fit (positions come
    in flat order). A band that misses the k-th (an unlucky sample) falls back to every score.
    """
    lo, hi = _band(n, score, k)
    keep = torch.empty(n, dtype=torch.bool)
    where, values = [], []
    for a in range(0, n, chunk):
        part, mask = score(a, a + chunk), keep[a:a + chunk]
        torch.gt(part, hi, out=mask)
        at = torch.nonzero((part >= lo).logical_xor_(mask)).view(-1)  # >= lo and not > hi (mask is inside)
        where.append(at + a)
        values.append(part[at])
    above = int(torch.count_nonzero(keep))
    where, values = torch.cat(where), torch.cat(values)
    if not above < k <= above + values.numel():  # the band missed the k-th: select from every score
        keep.zero_()
        above, where = 0, torch.arange(n)
        values = torch.cat([score(a, a + chunk) for a in range(0, n, chunk)]) if chunk < n else score(0, n)
        if not exact and bool(torch.isnan(values).any()):
            return None
    value = torch.kthvalue(values, values.numel() - (k - above) + 1).values
    if not exact and not abs(float(value)) < torch.finfo(value.dtype).max:
        return None
    higher = values > value
    keep[where[higher]] = True
    ties = where[values == value]  # in flat order: the lower indices first
    keep[ties[:k - above - int(torch.count_nonzero(higher))]] = True
    return keep


def _band(n: int, score, k: int) -> tuple[Tensor, Tensor]:
    """Bounds ``lo <= hi`` that likely hold the k-th largest of the ``n`` scores between them: the
    entries about four standard deviations either side of its expected rank in a strided sample
    (a prime stride, so that it does not follow a weight's layout). Only the band is selected
    from: ``kthvalue`` copies its input and adds an int64 index per entry."""
    inf = torch.tensor(torch.inf)
    if n < 2 * _SAMPLE:
        return -inf, inf  # small: the band is everything
    step = _prime_at_least(n // _SAMPLE)
    sample = score(0, n, step)
    size, expected = sample.numel(), k / step  # the k-th's rank in the sample, about
    spread = 4 * math.sqrt(expected) + 8
    top, bottom = math.floor(expected - spread), math.ceil(expected + spread)
    hi = torch.kthvalue(sample, size - top + 1).values if top >= 1 else inf.to(sample.dtype)
    lo = torch.kthvalue(sample, size - bottom + 1).values if bottom <= size else -inf.to(sample.dtype)
    return lo, hi


def _prime_at_least(m: int) -> int:
    while any(m % d == 0 for d in range(2, math.isqrt(m) + 1)):
        m += 1
    return m


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
