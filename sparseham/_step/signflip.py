"""The sign-flip kernels, both formulations side by side (the tracker's state: ``sparseham.tracking``).

Per tracked weight one int8 code: bits 0-1 hold the sign at the last update plus one (0 negative,
1 zero, 2 positive), bits 2-3 the sign at tracker start plus one, bit 4 "has flipped at least
once". Weight ``i`` flips between two updates when ``sign(before) * sign(now) < 0``.

- :func:`update_layer`, eager: int8 arithmetic after two comparisons. On CPUs, comparisons, bool
  sums and float/int8 conversions are several times slower than int8 ``*``, ``-``, ``&`` and
  ``count_nonzero``, so a flip is found as ``prod * prod - prod != 0`` with
  ``prod = sign_before * sign_now`` (it is 2 for ``prod == -1`` and 0 otherwise).
- :func:`track`, compiled (``SignFlipTracker(fused=True)`` and the one-pass step): float arithmetic
  on the small integer codes, which inductor vectorizes; the same codes and counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache

import torch
from torch import Tensor

from .compile import compile_kernel

__all__ = ["EVER", "SIGN", "flipped", "sign", "start_codes", "summary", "track", "update_all", "update_layer"]

SIGN, EVER = 0b11, 0b10000  # the bits of the last sign, and of "has flipped"
_KEEP_HIGH = 0b11100  # the start sign and "has flipped": what an update keeps


def sign(w: Tensor) -> Tensor:
    """sign(w) as int8, from two comparisons (no float -> int8 conversion)."""
    return torch.gt(w, 0).view(torch.int8) - torch.lt(w, 0).view(torch.int8)


def flipped(a: Tensor, b: Tensor) -> Tensor:
    """int8: 2 where the signs ``a`` and ``b`` (in -1, 0, 1) are opposite, else 0."""
    prod = a * b
    return prod * prod - prod


def start_codes(w: Tensor) -> Tensor:
    """The code of a weight at tracker start: its sign plus one in bits 0-1 and in bits 2-3."""
    return (sign(w) + 1) * 5


def update_layer(w: Tensor, code: Tensor, mask: Tensor | None, hist: Tensor | None) -> Tensor:
    """Count flips since the stored sign, update ``code`` in place; returns ``[masked, unmasked]``."""
    now = sign(w)
    flip = flipped((code & SIGN) - 1, now)
    total = torch.count_nonzero(flip)
    unmasked = total if mask is None else torch.count_nonzero(flip * mask.view(torch.int8))
    code.copy_((code & _KEEP_HIGH) | (now + 1) | (flip * 8))
    if hist is not None:  # counts in steps of 2 (flip is 0 or 2), saturating at 254
        hist.add_(flip.view(torch.uint8) * torch.lt(hist, 254).view(torch.uint8))
    return torch.stack([total - unmasked, unmasked])


def summary(code: Tensor) -> Tensor:
    """``[weights whose sign differs from the start, weights that ever flipped]`` of one layer."""
    now, start = (code & SIGN) - 1, torch.div(code & 0b1100, 4, rounding_mode="floor") - 1
    return torch.stack([torch.count_nonzero(flipped(now, start)), torch.count_nonzero(code & EVER)])


def track(w: Tensor, code: Tensor, counts: Tensor, mask: Tensor | None, hist: Tensor | None) -> None:
    """One layer's update for the compiled paths; the same codes and counts as :func:`update_layer`.

    The callers pass uint8 views of the codes and the mask (made outside the graph): inductor
    vectorizes uint8 loads and stores, not int8 or bool ones, and a view inside the graph costs a
    scalar loop. Sums in int32, or int64 for a tensor of 2^31 entries or more.
    """
    # Float arithmetic on the small integer codes (exact below 2^24): inductor's CPU code converts
    # between int8/int32 vectors and float masks slowly; float32 compares, floors and selects are cheap.
    c = code.to(torch.float32)
    high = torch.floor(c * 0.25) * 4  # code & _KEEP_HIGH
    flips = (c - high - 1) * w < 0  # (stored sign) * w < 0; a NaN w never flips, as sign()'s 0
    now = torch.where(w > 0, 2.0, torch.where(w < 0, 0.0, 1.0))  # sign + 1, NaN -> 1
    flip = flips.to(torch.int32)
    wide = torch.int32 if w.numel() < 2**31 else torch.int64
    total = flip.sum(dtype=wide)
    unmasked = total if mask is None else (flip * mask.to(torch.int32)).sum(dtype=wide)
    counts.add_(torch.stack([total - unmasked, unmasked]))
    if hist is not None:
        h = hist.to(torch.int32)
        hist.copy_(torch.where(h < 254, h + 2 * flip, h).to(torch.uint8))
    code.copy_((high + now + torch.where(flips & (c < EVER), float(EVER), 0.0)).to(code.dtype))


def _track_all(weights, codes, masks, hists, counts) -> None:
    for i, (w, code, n) in enumerate(zip(weights, codes, counts)):
        track(w, code, n, None if masks is None else masks[i], None if hists is None else hists[i])


@cache
def _compiled_all() -> Callable:
    return compile_kernel(_track_all, "signflip", dynamic=None,
                          fallback="SignFlipTracker(fused=False) runs the int8 kernels")


def update_all(weights: Sequence[Tensor], codes: Sequence[Tensor], masks: Sequence[Tensor] | None,
               hists: Sequence[Tensor] | None, counts: Sequence[Tensor]) -> None:
    """Every layer's :func:`track` as one compiled graph (``SignFlipTracker(fused=True)``)."""
    u8 = None if masks is None else [m.view(torch.uint8) for m in masks]
    _compiled_all()(list(weights), [c.view(torch.uint8) for c in codes], u8, hists, list(counts))
