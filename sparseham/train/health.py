"""Is training going bad? HAM's diagnostics and the loss, read at log intervals, and one warning.

:class:`TrainingHealth` reads :meth:`sparseham.HAM.diagnostics` at every log interval (a host read,
like the rest of the logger's), keeps the run's totals for ``final.json``, and prints **one**
warning line per run, with the diagnosis and the fix, when:

- the mirror step's exponent sits at the clamp on more than ``SATURATED`` of the weights for
  ``PATIENCE`` log intervals in a row while the loss is not falling (not below ``LEARNING`` times
  its first logged value): HAM is a multiplicative step of fixed size there, not the first-order
  flow it approximates, and the run is not learning. Saturation alone is no alarm: ResNet-20
  with BatchNorm at lr 0.1 and alpha 200 clamps 29-38% of its entries early on and 13-16% over the
  run, and trains better than without HAM (``docs/study/ham_resnet20``);
- the norm cap rescales weights in ``CAP_PATIENCE`` log intervals: the weights grow without bound;
- the training loss rises above ``LOSS_RISE`` times its first logged value (blamed on HAM when
  more than ``CLAMPING`` of its exponents sit at the clamp, or its cap fires, in the same
  interval).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["TrainingHealth", "SATURATED", "LEARNING", "CLAMPING", "PATIENCE", "LOSS_RISE"]

SATURATED = 0.5
LEARNING = 0.9
# With the authors' clamp of 5, a few percent of entries at the clamp already blow a run up: each
# is multiplied by up to e^5 per step. A rising loss is blamed on HAM from this fraction on.
CLAMPING = 0.001
PATIENCE = 5
CAP_PATIENCE = 3
LOSS_RISE = 3.0


class TrainingHealth:
    """Reads HAM's diagnostics at log intervals and diagnoses a run that goes bad.

    Args:
        optimizer: the run's optimizer; diagnostics are read when it has ``diagnostics()`` (HAM).
        names: parameter -> name, for the per-layer diagnostics.
        alpha_lr: ``ham.alpha * optim.lr``, quoted in the warning.
        clamp, max_norm: HAM's settings, quoted in the warnings.
    """

    def __init__(self, optimizer, names: dict, *, alpha_lr: float, clamp: float,
                 max_norm: float | None) -> None:
        self.optimizer, self.names = optimizer, names
        self.alpha_lr, self.clamp, self.max_norm = alpha_lr, clamp, max_norm
        self.enabled = hasattr(optimizer, "diagnostics")
        self.hits = self.entries = self.capped = 0
        self.saturated_in_a_row = self.capped_intervals = 0
        self.first_loss: float | None = None
        self.warned: str | None = None

    def update(self, loss: float) -> tuple[dict[str, Any] | None, str | None]:
        """Read the diagnostics since the last call; returns them and a new warning line, if any."""
        if self.first_loss is None and math.isfinite(loss):
            self.first_loss = loss
        diag = self.optimizer.diagnostics(self.names) if self.enabled else None
        if diag is not None:
            self.hits += diag["clamped"]
            self.entries += diag["entries"]
            self.capped += diag["capped"]
        return diag, self._diagnose(diag, loss)

    def _diagnose(self, diag: dict[str, Any] | None, loss: float) -> str | None:
        if self.warned is not None:
            return None
        saturated = capped = clamping = False
        if diag is not None and diag["steps"]:
            fraction = diag["clamped_fraction"]  # over the counted steps; 0 when none was counted
            saturated, capped = fraction > SATURATED, diag["capped"] > 0
            clamping = fraction > CLAMPING
            stalled = self.first_loss is not None and not loss < LEARNING * self.first_loss
            self.saturated_in_a_row = self.saturated_in_a_row + 1 if saturated and stalled else 0
            self.capped_intervals += capped
        rising = self.first_loss is not None and not loss <= LOSS_RISE * self.first_loss
        # A rising loss is blamed on HAM when HAM misbehaves in the same interval.
        if self.saturated_in_a_row >= PATIENCE or (rising and clamping):
            message = (f"HAM's exponent saturates on {100 * fraction:.0f}% of weights "
                       f"(alpha*lr = {self.alpha_lr:.3g}, ham.clamp = {self.clamp:g}): lower "
                       "ham.alpha or optim.lr")
        elif self.capped_intervals >= CAP_PATIENCE or (rising and capped):
            message = (f"HAM's norm cap (ham.max_norm = {self.max_norm:g}) rescaled weights in "
                       f"{self.capped_intervals} log intervals: the weights grow without bound "
                       f"(alpha*lr = {self.alpha_lr:.3g}); lower ham.alpha or optim.lr, or ham.clamp")
        elif rising:
            message = (f"the training loss rose to {loss:.4g}, over {LOSS_RISE:g}x its first logged "
                       f"value {self.first_loss:.4g}: lower optim.lr"
                       + (f" or ham.alpha (alpha*lr = {self.alpha_lr:.3g})" if self.enabled else ""))
        else:
            message = None
        self.warned = message
        return message

    def summary(self) -> dict[str, Any]:
        """The run's totals: the fraction of mirrored entries at the clamp, and the cap count."""
        fraction = self.hits / self.entries if self.entries else 0.0
        return {"clamped_fraction": fraction, "capped": self.capped}

    def state_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in ("hits", "entries", "capped", "saturated_in_a_row",
                                                     "capped_intervals", "first_loss", "warned")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
