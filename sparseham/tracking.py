"""SignFlipTracker: on-device counts of weights crossing zero, split by the mask in force.

Definition. Weight ``i`` flips between two tracker updates when
``sign(w_i before) * sign(w_i after) < 0``; a move to or from zero is not a flip. With
``interval=k`` the tracker compares signs every ``k`` steps, so it counts *net* flips over each
interval (a weight that flips and flips back within it counts zero). A flip is **unmasked** when
the weight is inside the mask in force at that update, else **masked** (for STR the implicit mask
``|w| > tau``; for AC/DC dense phases the last sparse mask).

State per tracked weight is one ``uint8`` code: bits 0-1 hold the sign at the last update
(0 zero, 1 positive, 2 negative), bits 2-3 the sign at tracker start, bit 4 "has flipped at least
once". ``per_weight=True`` adds one more byte, a saturating (at 255) per-weight flip count.
Counters stay on the device; only :meth:`read` copies them to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["SignFlipTracker"]

_SIGN_BITS, _KEEP_HIGH, _EVER = 0b11, 0b11111100, 0b10000


def _sign_code(w: Tensor) -> Tensor:
    """0 for zero, 1 for positive, 2 for negative, as uint8."""
    return (w > 0).to(torch.uint8) | ((w < 0).to(torch.uint8) << 1)


def _update_layer(w: Tensor, code: Tensor, mask: Tensor | None, hist: Tensor | None) -> Tensor:
    """Count flips since the stored sign, update ``code`` in place; returns ``[masked, unmasked]``."""
    now = _sign_code(w)
    # prev XOR now == 3 exactly when one is positive and the other negative.
    flip = ((code & _SIGN_BITS) ^ now) == 3
    total = flip.sum()
    unmasked = total if mask is None else (flip & mask).sum()
    code.copy_((code & _KEEP_HIGH) | now | (flip.to(torch.uint8) << 4))
    if hist is not None:
        hist.add_(flip & (hist < 255))
    return torch.stack([total - unmasked, unmasked])


class SignFlipTracker:
    """Count sign flips of managed weights on their device, with no host synchronisation.

    Args:
        interval: compare signs every ``interval`` steps (net flips over each interval).
        per_weight: also keep a saturating per-weight flip count (for histograms).

    The :class:`sparseham.MaskManager` calls :meth:`attach` once and :meth:`update` after every
    optimizer step; the logger calls :meth:`read` at its own interval.
    """

    def __init__(self, *, interval: int = 1, per_weight: bool = False) -> None:
        if not (isinstance(interval, int) and interval >= 1):
            raise ValueError(f"Invalid interval: {interval}; must be an int >= 1")
        self.interval = interval
        self.per_weight = per_weight
        self.names: list[str] = []
        self.codes: list[Tensor] = []
        self.hists: list[Tensor] | None = None
        self.counts: list[Tensor] = []
        self.steps = 0

    def attach(
        self, names: Sequence[str], weights: Sequence[Tensor], masks: Sequence[Tensor] | None = None
    ) -> None:
        """Start tracking ``weights``; their current signs are the reference for "differs from start"."""
        self.names = list(names)
        with torch.no_grad():
            self.codes = [(c | (c << 2)) for c in (_sign_code(w) for w in weights)]
        self.hists = [torch.zeros_like(c) for c in self.codes] if self.per_weight else None
        self.counts = [torch.zeros(2, dtype=torch.int64, device=w.device) for w in weights]
        self.steps = 0

    @torch.no_grad()
    def update(self, weights: Sequence[Tensor], masks: Sequence[Tensor] | None) -> None:
        """Called after every optimizer step; compares signs on every ``interval``-th call."""
        self.steps += 1
        if self.steps % self.interval:
            return
        for i, w in enumerate(weights):
            mask = None if masks is None else masks[i]
            hist = None if self.hists is None else self.hists[i]
            self.counts[i].add_(_update_layer(w, self.codes[i], mask, hist))

    def counters(self) -> Tensor:
        """Cumulative ``[masked, unmasked]`` flips per layer, shape ``(layers, 2)``, on the device."""
        return torch.stack(self.counts)

    def read(self) -> dict[str, dict[str, Any]]:
        """Copy the counters to the host (a synchronisation: call at log intervals only).

        Returns:
            layer name -> ``{"numel", "masked", "unmasked", "ever_flipped", "differs_from_init"}``
            with cumulative flip counts, plus ``"hist"`` (counts of weights by flip count) when
            ``per_weight`` is on.
        """
        per_layer = []
        for code in self.codes:
            now, start = code & _SIGN_BITS, (code >> 2) & _SIGN_BITS
            per_layer.append(torch.stack([((now ^ start) == 3).sum(), (code >= _EVER).sum()]))
        counts = torch.cat([self.counters(), torch.stack(per_layer)], dim=1).tolist()
        out = {}
        for i, name in enumerate(self.names):
            masked, unmasked, differs, ever = counts[i]
            out[name] = {
                "numel": self.codes[i].numel(),
                "masked": masked,
                "unmasked": unmasked,
                "ever_flipped": ever,
                "differs_from_init": differs,
            }
            if self.hists is not None:
                out[name]["hist"] = torch.bincount(self.hists[i].reshape(-1)).tolist()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "interval": self.interval,
            "steps": self.steps,
            "names": list(self.names),
            "codes": [c.clone() for c in self.codes],
            "hists": None if self.hists is None else [h.clone() for h in self.hists],
            "counts": [c.clone() for c in self.counts],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise ValueError("tracker state was saved for different layers than this tracker follows")
        self.interval, self.steps = state["interval"], state["steps"]
        self.codes = [c.to(old.device) for c, old in zip(state["codes"], self.codes)]
        self.counts = [c.to(old.device) for c, old in zip(state["counts"], self.counts)]
        if self.hists is not None and state["hists"] is not None:
            self.hists = [h.to(old.device) for h, old in zip(state["hists"], self.hists)]
