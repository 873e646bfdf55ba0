"""The shared part of the one-shot plug-ins (``magnitude``, ``wanda``, ``sparsegpt``).

Set-up prunes the model once with :func:`sparseham.oneshot.prune`, on calibration batches from
``MaskManager(..., data=batches)``, and installs the result as a static mask: the manager keeps
every pruned weight at exactly zero (with its gradient and optimizer state) while the model is
fine-tuned. Unlike the pruning-at-initialization scores (``static``), set-up changes the model:
pruned weights become zero, and SparseGPT also updates the kept ones.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sized
from typing import Any, ClassVar

from sparseham.method import Method
from sparseham.oneshot import OWL, needs_calibration, prune

__all__ = ["OneShot", "OneShotOptions", "calibration_batches"]

#: Batches taken from an iterator without a length (the training app's data) when none are set.
ITERATOR_BATCHES = 16


def _opt(default, text: str):
    return dataclasses.field(default=default, metadata={"help": text})


@dataclasses.dataclass
class OneShotOptions:
    """Options of the one-shot methods (the YAML sections ``sparsity.wanda``, ...)."""

    batches: int | None = _opt(None, "calibration batches taken from MaskManager data; null = every batch "
                                     f"of a list, or the first {ITERATOR_BATCHES} of an iterator (the "
                                     "training data)")
    owl: bool = _opt(False, "OWL: outlier-weighted layer sparsities (Yin et al. 2024) instead of "
                            "the distribution")
    owl_m: float = _opt(5.0, "OWL's outlier threshold M: a score above M times its layer's mean")
    owl_lambda: float = _opt(0.08, "OWL's lambda: layer sparsities lie within target +- lambda")
    sequential: bool | None = _opt(None, "null: a transformer block by block (each block calibrated "
                                         "on the pruned blocks' outputs); false: one pass with hooks")

    def __post_init__(self) -> None:
        b = self.batches
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"batches must be an integer >= 1 or null, got {b!r}")
        for key in ("owl", "sequential"):
            value = getattr(self, key)
            if not (isinstance(value, bool) or (key == "sequential" and value is None)):
                raise ValueError(f"{key} must be true or false{' or null' if key == 'sequential' else ''}, "
                                 f"got {value!r}")
        if self.owl:
            OWL(self.owl_m, self.owl_lambda)  # checks both


def calibration_batches(data: Any, count: int | None) -> list:
    """The calibration batches: ``count`` of them, or every one of a sized ``data``."""
    if data is None:
        return []
    if count is None and not isinstance(data, Sized):
        count = ITERATOR_BATCHES
    return list(itertools.islice(iter(data), count))


class OneShot(Method):
    """Base of the one-shot methods: prune in :meth:`setup`, then keep the mask (see the module)."""

    Options = OneShotOptions
    masking = True
    supports_pattern = True
    default_distribution = "uniform"  # as the references: every layer at the target
    distributions = ("uniform", "er", "erk", "global")
    inits = ("random",)  # the schema's default; the one-shot score is the method itself
    solver: ClassVar[str] = ""

    def __init__(self, target: float = 0.0, **kwargs) -> None:
        super().__init__(target, **kwargs)
        if self.options.owl and self.pattern:
            raise ValueError(f"{self.name}: owl allocates unstructured sparsity; it does not combine with "
                             "an N:M pattern")
        self.report: dict[str, Any] = {}

    def setup(self, manager) -> None:
        o = self.options
        needs_data = needs_calibration(self.solver, OWL() if o.owl else None)
        batches = calibration_batches(manager.data, o.batches) if needs_data else []
        try:
            result = prune(
                manager.model, batches, method=self.solver, sparsity=self.target, pattern=self.pattern,
                distribution=self.distribution, owl=OWL(o.owl_m, o.owl_lambda) if o.owl else None,
                params=list(zip(manager.names, manager.params)), dense_layers=self.dense_layers,
                layer_density=self.layer_density, sequential=o.sequential)
        except ValueError as e:
            hint = "; pass MaskManager(..., data=batches)" if not batches and "calibration" in str(e) else ""
            raise ValueError(f"{self.name}: {e}{hint}") from None
        manager.set_masks(result.masks, expected=result.kept)
        self.report = {"calibration_batches": len(batches), "pruned_sparsity": result.sparsity}
        if result.losses:
            self.report["obs_error"] = {n: v for n, v in result.losses.items() if math.isfinite(v)}

    def summary(self) -> dict[str, Any]:
        return dict(self.report)
