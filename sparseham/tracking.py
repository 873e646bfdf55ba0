"""SignFlipTracker: on-device counts of weights crossing zero, split by the mask in force.

Definition. Weight ``i`` flips between two tracker updates when
``sign(w_i before) * sign(w_i after) < 0``; a move to or from zero is not a flip. With
``interval=k`` the tracker compares signs every ``k`` steps, so it counts *net* flips over each
interval (a weight that flips and flips back within it counts zero). A flip is **unmasked** when
the weight is inside the mask in force at that update, else **masked** (for STR the implicit mask
``|w| > tau``; for AC/DC dense phases the last sparse mask).

The kernels and the code each weight keeps (one ``int8``, plus one byte for ``per_weight=True``, a
flip count that saturates at 127) are in ``sparseham._step.signflip``. Counters stay on the device;
only :meth:`SignFlipTracker.read` copies them to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import sharding
from ._step import signflip
from ._step.plan import TrackState

__all__ = ["SignFlipTracker"]


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
            self.codes = [signflip.start_codes(w) for w in weights]
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
                ``sparseham._step.one_pass`` updated ``codes`` and ``counts``); only count the step.
        """
        self.steps += 1
        if compared or self.steps % self.interval:
            return
        weights = [sharding.local(w) for w in weights]
        masks = None if masks is None else [sharding.local(m) for m in masks]
        if self.fused:
            signflip.update_all(weights, self.codes, masks, self.hists, self.counts)
            return
        for i, w in enumerate(weights):
            mask = None if masks is None else masks[i]
            hist = None if self.hists is None else self.hists[i]
            self.counts[i].add_(signflip.update_layer(w, self.codes[i], mask, hist))

    def in_pass_states(self, masks: Sequence[Tensor] | None) -> list[TrackState] | None:
        """The state the next update changes, per layer, for an optimizer step that compares the
        signs inside its own pass (the one-pass step), split by ``masks``; ``None`` when that
        cannot stand in for :meth:`update`: not a comparing step, sharded weights, or a subclass
        with an ``update`` of its own."""
        if not self.due() or self.sharded or type(self).update is not SignFlipTracker.update:
            return None
        return [TrackState(code, counts, None if masks is None else masks[i],
                           None if self.hists is None else self.hists[i])
                for i, (code, counts) in enumerate(zip(self.codes, self.counts))]

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
        per_layer = [signflip.summary(code) for code in self.codes]
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
