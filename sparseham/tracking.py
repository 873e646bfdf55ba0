"""SignFlipTracker: on-device counts of weights crossing zero, split by the mask in force.

Definition. Weight ``i`` flips between two tracker updates when
``sign(w_i before) * sign(w_i after) < 0``; a move to or from zero is not a flip. With
``interval=k`` the tracker compares signs every ``k`` steps, so it counts *net* flips over each
interval (a weight that flips and flips back within it counts zero). A flip is **unmasked** when
the weight is inside the mask in force at that update, else **masked** (for STR the implicit mask
``|w| > tau``; for AC/DC dense phases the last sparse mask).

State per tracked weight is one ``int8`` code: bits 0-1 hold the sign at the last update plus one
(0 negative, 1 zero, 2 positive), bits 2-3 the sign at tracker start plus one, bit 4 "has flipped
at least once". ``per_weight=True`` adds one more byte, a per-weight flip count that saturates at
127. Counters stay on the device; only :meth:`read` copies them to the host.

The update uses only int8 arithmetic after two comparisons: on CPUs, comparisons, bool sums and
float/int8 conversions are several times slower than int8 ``*``, ``-``, ``&`` and
``count_nonzero``, so a flip is found as ``prod * prod - prod != 0`` with
``prod = sign_before * sign_now`` (it is 2 for ``prod == -1`` and 0 otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import sharding
from ._ham_kernels import import_cpp_extension_quietly

__all__ = ["SignFlipTracker"]

_SIGN, _KEEP_HIGH, _EVER = 0b11, 0b11100, 0b10000


def _sign(w: Tensor) -> Tensor:
    """sign(w) as int8, from two comparisons (no float -> int8 conversion)."""
    return torch.gt(w, 0).view(torch.int8) - torch.lt(w, 0).view(torch.int8)


def _flipped(a: Tensor, b: Tensor) -> Tensor:
    """int8: 2 where the signs ``a`` and ``b`` (in -1, 0, 1) are opposite, else 0."""
    prod = a * b
    return prod * prod - prod


def _update_layer(w: Tensor, code: Tensor, mask: Tensor | None, hist: Tensor | None) -> Tensor:
    """Count flips since the stored sign, update ``code`` in place; returns ``[masked, unmasked]``."""
    now = _sign(w)
    flip = _flipped((code & _SIGN) - 1, now)
    total = torch.count_nonzero(flip)
    unmasked = total if mask is None else torch.count_nonzero(flip * mask.view(torch.int8))
    code.copy_((code & _KEEP_HIGH) | (now + 1) | (flip * 8))
    if hist is not None:  # counts in steps of 2 (flip is 0 or 2), saturating at 254
        hist.add_(flip.view(torch.uint8) * torch.lt(hist, 254).view(torch.uint8))
    return torch.stack([total - unmasked, unmasked])


def _track(w: Tensor, code: Tensor, counts: Tensor, mask: Tensor | None, hist: Tensor | None) -> None:
    """One layer's update for the compiled paths (``fused=True``, and the one-pass optimizer step
    of ``sparseham._fused_step``); the same codes and counts as :func:`_update_layer`.

    The callers pass uint8 views of the codes and the mask (made outside the graph): inductor
    vectorizes uint8 loads and stores, not int8 or bool ones, and a view inside the graph costs a
    scalar loop. Sums in int32, or int64 for a tensor of 2^31 entries or more.
    """
    # Float arithmetic on the small integer codes (exact below 2^24): inductor's CPU code converts
    # between int8/int32 vectors and float masks slowly; float32 compares, floors and selects are cheap.
    c = code.to(torch.float32)
    high = torch.floor(c * 0.25) * 4  # code & _KEEP_HIGH
    flipped = (c - high - 1) * w < 0  # (stored sign) * w < 0; a NaN w never flips, as _sign's 0
    now = torch.where(w > 0, 2.0, torch.where(w < 0, 0.0, 1.0))  # sign + 1, NaN -> 1
    flip = flipped.to(torch.int32)
    wide = torch.int32 if w.numel() < 2**31 else torch.int64
    total = flip.sum(dtype=wide)
    unmasked = total if mask is None else (flip * mask.to(torch.int32)).sum(dtype=wide)
    counts.add_(torch.stack([total - unmasked, unmasked]))
    if hist is not None:
        h = hist.to(torch.int32)
        hist.copy_(torch.where(h < 254, h + 2 * flip, h).to(torch.uint8))
    code.copy_((high + now + torch.where(flipped & (c < _EVER), float(_EVER), 0.0)).to(code.dtype))


def _update_all(weights, codes, masks, hists, counts) -> None:
    """Every layer's :func:`_track` as one graph for ``torch.compile`` (``fused=True``)."""
    for i, (w, code, n) in enumerate(zip(weights, codes, counts)):
        _track(w, code, n, None if masks is None else masks[i], None if hists is None else hists[i])


class SignFlipTracker:
    """Count sign flips of managed weights on their device, with no host synchronisation.

    Args:
        interval: compare signs every ``interval`` steps (net flips over each interval).
        per_weight: also keep a saturating per-weight flip count (for histograms).
        fused: run the update of all layers as one ``torch.compile`` graph: several times faster on
            CPU after a one-off compile (tens of seconds); the counts are identical.

    The :class:`sparseham.MaskManager` calls :meth:`attach` once and :meth:`update` after every
    optimizer step; the logger calls :meth:`read` at its own interval.
    """

    def __init__(self, *, interval: int = 1, per_weight: bool = False, fused: bool = False) -> None:
        if not (isinstance(interval, int) and interval >= 1):
            raise ValueError(f"Invalid interval: {interval}; must be an int >= 1")
        self.interval = interval
        self.fused = fused
        self._compiled = None
        self.per_weight = per_weight
        self.names: list[str] = []
        self.codes: list[Tensor] = []
        self.hists: list[Tensor] | None = None
        self.counts: list[Tensor] = []
        self._like: list[Tensor] | None = None
        self.steps = 0

    def attach(
        self, names: Sequence[str], weights: Sequence[Tensor], masks: Sequence[Tensor] | None = None
    ) -> None:
        """Start tracking ``weights``; their current signs are the reference for "differs from start"."""
        self.names = list(names)
        # Sharded weights (FSDP2): every rank tracks its own shard; counters meet only when read.
        self._like = list(weights) if any(sharding.is_sharded(w) for w in weights) else None
        weights = [sharding.local(w) for w in weights]
        with torch.no_grad():
            self.codes = [(s + 1) * 5 for s in (_sign(w) for w in weights)]  # (s+1) | (s+1) << 2
        self.hists = [torch.zeros_like(c, dtype=torch.uint8) for c in self.codes] if self.per_weight else None
        self.counts = [torch.zeros(2, dtype=torch.int64, device=w.device) for w in weights]
        self.steps = 0

    def due(self) -> bool:
        """Whether the next :meth:`update` compares signs (every ``interval``-th)."""
        return (self.steps + 1) % self.interval == 0

    @property
    def sharded(self) -> bool:
        """Whether the tracked weights are FSDP shards (each rank tracks its own)."""
        return self._like is not None

    @torch.no_grad()
    def update(self, weights: Sequence[Tensor], masks: Sequence[Tensor] | None, *,
               compared: bool = False) -> None:
        """Called after every optimizer step; compares signs on every ``interval``-th call.

        Args:
            compared: the optimizer step already compared them (the one-pass step of
                ``sparseham._fused_step`` updates ``codes`` and ``counts`` itself); only count the step.
        """
        self.steps += 1
        if compared or self.steps % self.interval:
            return
        weights = [sharding.local(w) for w in weights]
        masks = None if masks is None else [sharding.local(m) for m in masks]
        if self.fused:
            if self._compiled is None:
                import_cpp_extension_quietly()
                self._compiled = torch.compile(_update_all, fullgraph=True)
            u8 = None if masks is None else [m.view(torch.uint8) for m in masks]
            codes = [c.view(torch.uint8) for c in self.codes]
            self._compiled(list(weights), codes, u8, self.hists, self.counts)
            return
        for i, w in enumerate(weights):
            mask = None if masks is None else masks[i]
            hist = None if self.hists is None else self.hists[i]
            self.counts[i].add_(_update_layer(w, self.codes[i], mask, hist))

    def counters(self) -> Tensor:
        """Cumulative ``[masked, unmasked]`` flips per layer, shape ``(layers, 2)``, on the device
        (summed over ranks when the weights are sharded: a collective, every rank calls it)."""
        return self._summed(torch.stack(self.counts))

    def _summed(self, t: Tensor) -> Tensor:
        return t if self._like is None else sharding.sum_over_ranks(t, self._like[0])

    def read(self) -> dict[str, dict[str, Any]]:
        """Copy the counters to the host (a synchronisation: call at log intervals only).

        Returns:
            layer name -> ``{"numel", "masked", "unmasked", "ever_flipped", "differs_from_init"}``
            with cumulative flip counts, plus ``"hist"`` (counts of weights by flip count) when
            ``per_weight`` is on.
        """
        per_layer = []
        for code in self.codes:
            now, start = (code & _SIGN) - 1, torch.div(code & 0b1100, 4, rounding_mode="floor") - 1
            per_layer.append(
                torch.stack([torch.count_nonzero(_flipped(now, start)), torch.count_nonzero(code & _EVER)])
            )
        counts = self._summed(torch.cat([torch.stack(self.counts), torch.stack(per_layer)], dim=1)).tolist()
        out = {}
        for i, name in enumerate(self.names):
            masked, unmasked, differs, ever = counts[i]
            out[name] = {
                "numel": (self._like or self.codes)[i].numel(),
                "masked": masked,
                "unmasked": unmasked,
                "ever_flipped": ever,
                "differs_from_init": differs,
            }
            if self.hists is not None:
                bins = 128 if self._like is not None else 0  # shards: equal lengths to sum
                hist = torch.bincount(self.hists[i].reshape(-1).long() // 2, minlength=bins)
                out[name]["hist"] = self._summed(hist).tolist()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "interval": self.interval,
            "steps": self.steps,
            "names": list(self.names),
            "codes": self._shards(self.codes),
            "hists": None if self.hists is None else self._shards(self.hists),
            "counts": [c.clone() for c in self.counts] if self._like is None else
                      [c.clone() for c in self._summed(torch.stack(self.counts))],
        }

    def _shards(self, tensors: list[Tensor]) -> list[Tensor]:
        """Copies of per-weight state; sharded, as shards of the whole (``sharding.full`` gathers)."""
        if self._like is None:
            return [t.clone() for t in tensors]
        return [sharding.wrap(t.clone(), like) for t, like in zip(tensors, self._like)]

    def _local(self, saved: list[Tensor], current: list[Tensor]) -> list[Tensor]:
        if self._like is None:
            return [c.to(old.device) for c, old in zip(saved, current)]
        return [sharding.local(sharding.local_slice(c, like)).to(old.device)
                for c, like, old in zip(saved, self._like, current)]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise ValueError("tracker state was saved for different layers than this tracker follows")
        self.interval, self.steps = state["interval"], state["steps"]
        self.codes = self._local(state["codes"], self.codes)
        counts = [c.to(old.device) for c, old in zip(state["counts"], self.counts)]
        if self._like is not None and dist.get_rank(self._like[0].device_mesh.get_group()) != 0:
            counts = [torch.zeros_like(c) for c in counts]  # saved summed: rank 0 carries the total
        self.counts = counts
        if self.hists is not None and state["hists"] is not None:
            self.hists = self._local(state["hists"], self.hists)
