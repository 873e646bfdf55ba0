"""AC/DC: Alternating Compressed/DeCompressed training (Peste et al. 2021), as the authors' code
(IST-DASLab/ACDC) runs it.

The timeline (see :func:`sparseham.schedules.acdc_phases`, which reproduces the authors' ImageNet
and CIFAR phase lists): a dense warm-up, then compressed (sparse) and decompressed (dense)
phases in turn, always ending decompressed, then a final compressed phase that ends training.

- Compression, at the start of every compressed phase, keeps the top-``|w|`` weights of the
  current dense weights at the full target: one global magnitude threshold by default (the
  authors' ``UnstructuredMagnitudePruner``, ``policies/pruners.py``), or per layer with a
  distribution. Pruned weights and their optimizer state are zeroed and stay zero in the phase.
- Decompression drops the mask; the pruned weights re-enter training from exactly zero. By
  default (``reset_state: decompression``) every optimizer-state tensor shaped like its
  parameter is zeroed then, for every parameter the optimizer holds, BatchNorm and biases
  included: the authors' ``--reset_momentum_after_recycling`` (``optimization/sgd.py``
  ``reset_momentum_buffer``). ``none`` never resets; ``switch`` zeroes the managed weights'
  state at every phase switch (this project's earlier option).
- The paper's ResNet-50 schedule (100 epochs: 10 warm-up, 5-epoch phases, dense [75, 85), the
  final 15 compressed) is the default, scaled to the run length: ``warmup=0.1``, ``phase=0.05``,
  ``final=0.15`` as fractions of training. Set ``unit`` to ``epochs`` or ``steps`` to give
  absolute lengths.
- Mask churn is measured between consecutive compressed phases. During decompressed phases the
  sign-flip tracker splits flips by the last compressed mask (weights outside it are "masked").
"""

from __future__ import annotations

import dataclasses

import torch

from sparseham.method import Method
from sparseham.schedules import acdc_phases, phase_at, to_steps

from . import register
from ._common import magnitude_masks

__all__ = ["ACDC"]


@dataclasses.dataclass
class ACDCOptions:
    warmup: float = dataclasses.field(default=0.1, metadata={"help": "length of the dense warm-up"})
    phase: float = dataclasses.field(
        default=0.05, metadata={"help": "length of each compressed and decompressed phase"}
    )
    final: float = dataclasses.field(
        default=0.15, metadata={"help": "minimum length of the final compressed phase"}
    )
    unit: str = dataclasses.field(
        default="fraction",
        metadata={"help": "unit of warmup/phase/final: fraction (of training), epochs, steps"},
    )
    reset_state: str = dataclasses.field(
        default="decompression",
        metadata={"help": "decompression: zero all optimizer state at each decompression (the authors'); "
                          "none; switch: zero the managed weights' state at every phase switch"},
    )

    def __post_init__(self):
        if self.unit not in ("fraction", "epochs", "steps"):
            raise ValueError(f"unit must be fraction, epochs or steps, got {self.unit!r}")
        for name in ("warmup", "phase", "final"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.phase == 0:
            raise ValueError("phase must be > 0")
        if self.reset_state not in ("decompression", "none", "switch"):
            raise ValueError(f"reset_state must be decompression, none or switch, got {self.reset_state!r}")


@register("acdc")
class ACDC(Method):
    """AC/DC with global-magnitude compression (see the module docstring)."""

    Options = ACDCOptions
    default_distribution = "global"

    def setup(self, manager) -> None:
        if manager.total_steps is None:
            raise ValueError("acdc: needs the length of training: MaskManager(..., total_steps=N)")
        o = self.options
        steps = [
            to_steps(v, o.unit, manager.total_steps, manager.steps_per_epoch)
            for v in (o.warmup, o.phase, o.final)
        ]
        self.phases = acdc_phases(manager.total_steps, *steps)
        self.last_sparse: list[torch.Tensor] | None = None
        self._enter(manager, phase_at(self.phases, 0))

    def _enter(self, manager, phase) -> None:
        manager.phase = "compressed" if phase.sparse else "decompressed"
        reset = self.options.reset_state
        if reset == "switch":
            manager.zero_state_([torch.ones_like(p, dtype=torch.bool) for p in manager.params])
        elif reset == "decompression" and not phase.sparse and manager.step_count > 0:
            manager.reset_optimizer_state_()
        if phase.sparse:
            weights = [p.detach() for p in manager.params]
            masks, expected = magnitude_masks(
                manager, weights, self.target, self.distribution, self.dense_layers, self.layer_density
            )
            manager.set_masks(masks, expected=expected, reference=self.last_sparse)
            self.last_sparse = manager.masks
        elif manager.masks is not None or manager.step_count == 0:
            manager.clear_masks()

    def post_step(self, manager) -> None:
        step = manager.step_count
        if any(p.start == step for p in self.phases) and step < manager.total_steps:
            self._enter(manager, phase_at(self.phases, step))

    def tracking_masks(self, manager):
        return manager.masks if manager.masks is not None else self.last_sparse

    def state_dict(self):
        return {"last_sparse": None if self.last_sparse is None else [m.clone() for m in self.last_sparse]}

    def load_state_dict(self, state) -> None:
        self.last_sparse = state["last_sparse"]
