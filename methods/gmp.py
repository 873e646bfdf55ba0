r"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune").

Training starts dense (or at ``initial`` sparsity). Every ``every`` steps from ``start`` to
``end``, and once more exactly at ``end``, the masks are recomputed by weight magnitude to the
cubic schedule (:func:`sparseham.schedules.cubic_sparsity`)

.. math:: s_t = s_f + (s_i - s_f)\left(1 - \frac{t - t_0}{t_{end} - t_0}\right)^3,

per layer by ``distribution`` (uniform, ER, ERK: each layer at its share of :math:`s_t`) or with
one global threshold (``global``); from ``end`` on the mask is fixed at the target
:math:`s_f`. Pruned weights are exactly zero with masked gradients and state, so they rank
lowest at the next update and the masks only shrink, as in the reference implementation
(TensorFlow ``model_pruning``, ``pruning.py``'s ``_update_mask`` with its polynomial
``sparsity_function_exponent = 3``). ``start``/``end`` are fractions of training, epochs or steps
(``unit``); the defaults prune over the first 10% to 80% of training. With ``init: existing`` the
first mask is the zeros the weights already have (a one-shot prune), and the schedule starts at
their sparsity instead of ``initial``.
"""

from __future__ import annotations

import dataclasses

from sparseham.method import Method
from sparseham.schedules import cubic_sparsity, to_steps

from . import register
from ._common import check_init, existing_masks, magnitude_masks, pattern_masks

__all__ = ["GMP"]


@dataclasses.dataclass
class GMPOptions:
    start: float = dataclasses.field(default=0.1, metadata={"help": "first pruning step (t_0)"})
    end: float = dataclasses.field(default=0.8, metadata={"help": "last pruning step (t_end); fixed after"})
    every: int = dataclasses.field(default=100, metadata={"help": "steps between mask updates (Delta t)"})
    initial: float = dataclasses.field(default=0.0, metadata={"help": "sparsity s_i at start"})
    unit: str = dataclasses.field(
        default="fraction", metadata={"help": "unit of start/end: fraction (of training), epochs, steps"}
    )

    def __post_init__(self):
        if not (isinstance(self.every, int) and self.every >= 1):
            raise ValueError(f"every must be an int >= 1, got {self.every}")
        if not 0.0 <= self.start < self.end:
            raise ValueError(f"need 0 <= start < end, got start {self.start}, end {self.end}")
        if not 0.0 <= self.initial < 1.0:
            raise ValueError(f"initial must be in [0, 1), got {self.initial}")
        if self.unit not in ("fraction", "epochs", "steps"):
            raise ValueError(f"unit must be fraction, epochs or steps, got {self.unit!r}")


@register("gmp")
class GMP(Method):
    """Gradual magnitude pruning to ``target`` on a cubic schedule (see the module docstring)."""

    Options = GMPOptions
    default_distribution = "uniform"  # TF model_pruning: one mask per tensor, each at s_t
    supports_pattern = True
    inits = ("random", "existing")

    def __init__(self, target: float = 0.0, **kwargs) -> None:
        super().__init__(target, **kwargs)
        check_init(self)
        self.initial = self.options.initial

    def setup(self, manager) -> None:
        o = self.options
        if manager.total_steps is None:
            raise ValueError("gmp: needs the length of training: MaskManager(..., total_steps=N)")
        if o.initial > self.target:
            raise ValueError(f"gmp: initial sparsity {o.initial} exceeds the target {self.target}")
        steps = [to_steps(v, o.unit, manager.total_steps, manager.steps_per_epoch) for v in (o.start, o.end)]
        self.start, self.end = steps[0], min(steps[1], manager.total_steps)
        if self.end <= self.start:
            raise ValueError(f"gmp: pruning ends at step {self.end}, not after it starts ({self.start})")
        if self.init == "existing":
            masks, counts = existing_masks(manager, None, self.pattern, "gmp")
            self.initial = 1.0 - sum(counts) / sum(p.numel() for p in manager.params)
            if self.initial > self.target:
                raise ValueError(f"gmp: init 'existing': the weights are already {self.initial:.2%} zeros, "
                                 f"more than the target {self.target:.2%}")
            manager.set_masks(masks, expected=counts)
        elif o.initial > 0:
            self._prune(manager, o.initial)

    def sparsity_at(self, step: int) -> float:
        """The schedule's sparsity at ``step``."""
        return cubic_sparsity(step, self.start, self.end, self.initial, self.target)

    def _updates_at(self, step: int) -> bool:
        on_grid = self.start <= step <= self.end and (step - self.start) % self.options.every == 0
        return on_grid or step == self.end

    def post_step(self, manager) -> None:
        step = manager.step_count
        if self._updates_at(step) and self.sparsity_at(step) > 0:
            self._prune(manager, self.sparsity_at(step))

    def _prune(self, manager, sparsity: float) -> None:
        weights = [p.detach() for p in manager.params]
        if self.pattern:  # the schedule in whole weights per group: m, ..., down to n at the end
            n, m = self.pattern
            keep = min(m, max(n, round(m * (1 - sparsity))))
            masks, counts = pattern_masks(manager, [w.abs() for w in weights], keep, m)
            manager.set_masks(masks, expected=counts)
            return
        masks, expected = magnitude_masks(manager, weights, sparsity, self.distribution,
                                          self.dense_layers, self.layer_density)
        manager.set_masks(masks, expected=expected)
