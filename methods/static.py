"""Pruning at initialization (``static``): one mask, scored once in ``setup`` and kept fixed.

Scores come from :mod:`sparseham.methods.scoring`. Three inits start from a trained model instead:
``existing`` keeps the zeros the weights already have (a model pruned before, e.g. by
``sparseham prune``), and ``wanda`` and ``sparsegpt`` prune it once with calibration batches from
``MaskManager(..., data=...)`` (``batches`` of them) exactly as the methods of those names do,
changing its weights (see :mod:`sparseham.methods.wanda`); the mask is then kept fixed.

With distribution ``uniform``, ``er`` or ``erk`` each layer keeps its top ``layer_counts`` scores;
with ``global`` one threshold runs over all layers (``dense_layers`` stay dense and out of the
competition). Set-up of the scored inits leaves the model and the global RNG exactly as they were
(scores use a copy; data is read under ``torch.random.fork_rng``).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from sparseham.method import Method, get, register, suggest

from . import scoring
from ._common import existing_masks, pattern_masks, score_masks

__all__ = ["Static", "StaticOptions"]


def _opt(default, text: str):
    return dataclasses.field(default=default, metadata={"help": text})


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"static: {name} must be an integer >= {low}, got {value!r}")


@dataclasses.dataclass
class StaticOptions:
    """Options of :class:`Static` (the YAML section ``sparsity.static``)."""

    batches: int = _opt(1, "data batches that SNIP and GraSP score on, and init wanda and sparsegpt "
                           "calibrate on (MaskManager data=)")
    synflow_rounds: int = _opt(100, "SynFlow rounds; round r keeps density (1-target)^(r/rounds)")
    grasp_temperature: float = _opt(200.0, "GraSP divides the logits by this temperature")
    remove_dead: bool = _opt(False, "also prune units with no input or output path left "
                                    "(plain nn.Sequential models); sparsity then exceeds target")
    input_shape: list[int] | None = _opt(None, "SynFlow input shape without the batch dim; "
                                               "null = taken from the first data batch")
    seed: int | None = _opt(None, "seed of init=random; null = torch.initial_seed()")

    def __post_init__(self) -> None:
        _check_int("batches", self.batches, 1)
        _check_int("synflow_rounds", self.synflow_rounds, 1)
        t = self.grasp_temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf:
            raise ValueError(f"static: grasp_temperature must be a finite number > 0, got {t!r}")
        if not isinstance(self.remove_dead, bool):
            raise ValueError(f"static: remove_dead must be true or false, got {self.remove_dead!r}")
        shape = self.input_shape
        if shape is not None and (not isinstance(shape, (list, tuple)) or not shape or any(
                isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)):
            raise ValueError(f"static: input_shape must be a non-empty list of integers >= 1 "
                             f"(no batch dim, e.g. [3, 32, 32]) or null, got {shape!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, 0)


@register("static")
class Static(Method):
    """Pruning at initialization with a fixed mask; ``init`` picks the score (see the module).

    Args: those of :class:`sparseham.Method`, plus the fields of :class:`StaticOptions`.
    """

    Options = StaticOptions
    masking = True
    inits = ("random", "magnitude", "snip", "grasp", "synflow", "existing", "wanda", "sparsegpt")
    distributions = ("uniform", "er", "erk", "global")
    supports_pattern = True

    @classmethod
    def distribution_for(cls, init: str) -> str:
        # The papers and Synaptic-Flow (its default --mask-scope global) rank scored inits over all
        # layers at once; random scores cannot rank layers, so random PaI takes ERK quotas. The
        # one-shot references prune every layer at the target.
        if init in ("wanda", "sparsegpt", "existing"):
            return "uniform"
        return "erk" if init == "random" else "global"

    def __init__(self, target: float = 0.0, **kwargs) -> None:
        self.report: dict = {}  # what a one-shot init reports (summary())
        super().__init__(target, **kwargs)
        if self.init not in self.inits:
            raise ValueError(f"static: unknown init {self.init!r}{suggest(self.init, self.inits)}; "
                             f"choose one of {', '.join(self.inits)}")
        if self.init == "random" and self.distribution == "global":
            raise ValueError("static: init 'random' with distribution 'global' is meaningless "
                             "(random scores do not rank layers); use distribution uniform, er "
                             "or erk, or another init")

    def setup(self, manager) -> None:
        if self.init == "existing":
            manager.set_masks(*existing_masks(manager, self.target, self.pattern, "static"))
            return
        if self.init in ("wanda", "sparsegpt"):
            self._one_shot(manager)
            return
        devices = sorted({p.get_device() for p in manager.params if p.is_cuda})
        with torch.random.fork_rng(devices=devices):
            scores = _SCORES[self.init](self, manager)
        masks, counts = self.select(manager, scores, self.target)
        if self.options.remove_dead:
            masks = scoring.remove_dead_units(manager.model, manager.params, masks)
            counts = [int(m.sum()) for m in masks]
        manager.set_masks(masks, expected=counts)

    def _one_shot(self, manager) -> None:
        """Prune with the one-shot method named by ``init``, on ``batches`` calibration batches."""
        pattern = f"{self.pattern[0]}:{self.pattern[1]}" if self.pattern else None
        method = get(self.init)(self.target, distribution=self.distribution, dense_layers=self.dense_layers,
                                layer_density=self.layer_density, pattern=pattern,
                                batches=self.options.batches)
        method.setup(manager)
        self.report = method.summary()

    def summary(self) -> dict:
        return dict(self.report)

    def select(self, manager, scores: list[Tensor], sparsity: float
               ) -> tuple[list[Tensor], list[int] | int]:
        """Masks of the highest ``scores`` at ``sparsity``, and the kept counts: per layer, or
        for ``global`` the total (the split is only known on the device; ``verify`` checks it)."""
        if self.pattern:
            return pattern_masks(manager, scores, *self.pattern)
        try:
            return score_masks(manager, scores, sparsity, self.distribution, self.dense_layers,
                               self.layer_density)
        except ValueError as e:
            raise ValueError(f"static: {e}") from None


def _batches(method: Static, manager) -> list:
    if manager.data is None:
        raise ValueError(f"static: init '{method.init}' scores with data; pass "
                         "MaskManager(..., data=batches) or use init random, magnitude or synflow")
    device = manager.params[0].device
    batches = scoring.first_batches(manager.data, method.options.batches, device)
    if not batches:
        raise ValueError(f"static: init '{method.init}' got no batch from MaskManager data")
    return batches


def _synflow(method: Static, manager) -> list[Tensor]:
    shape = method.options.input_shape
    if shape is None and manager.data is None:
        raise ValueError("static: init 'synflow' needs the input shape; set the option "
                         "input_shape (e.g. [3, 32, 32]) or pass MaskManager(..., data=batches)")
    shape = shape or _batches(method, manager)[0][0].shape[1:]
    density = 1.0 - method.target
    return scoring.synflow(
        manager.model, manager.params, shape, rounds=method.options.synflow_rounds,
        prune=lambda scores, frac: method.select(manager, scores, 1.0 - density**frac)[0])


_SCORES = {
    # A generator of its own: the global RNG stream stays as it was.
    "random": lambda m, mm: scoring.random(mm.params, torch.Generator().manual_seed(
        torch.initial_seed() if m.options.seed is None else m.options.seed)),
    "magnitude": lambda m, mm: scoring.magnitude(mm.params),
    "snip": lambda m, mm: scoring.snip(mm.model, mm.params, _batches(m, mm), mm.loss_fn),
    # GraSP removes the highest S, so the kept weights are the top-k of -S.
    "grasp": lambda m, mm: [-s for s in scoring.grasp(
        mm.model, mm.params, _batches(m, mm), mm.loss_fn, m.options.grasp_temperature)],
    "synflow": _synflow,
}
