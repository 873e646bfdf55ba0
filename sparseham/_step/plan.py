"""What one step is asked to do, with named fields: the hand-over between the manager, HAM and
the one-pass executor (:mod:`.one_pass`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from torch import Tensor

__all__ = ["GroupPlan", "Mirror", "StepPlan", "TrackState"]


class TrackState(NamedTuple):
    """One tensor's sign-flip tracker state, updated in place by the step that compares signs."""

    code: Tensor  # int8 code per weight (see sparseham.tracking)
    counts: Tensor  # int64 [masked, unmasked] flips
    mask: Tensor | None  # the mask that splits flips (None: every flip counts as unmasked)
    hist: Tensor | None  # uint8 per-weight flip counts (per_weight=True)


class Mirror(NamedTuple):
    """HAM's mirror step for one param group: ``x *= exp(clamp(-lr*(alpha*sign*g + beta)))``."""

    lr: float
    alpha: float
    beta: float
    clamp: float


@dataclass
class StepPlan:
    """What :class:`sparseham.MaskManager` hands ``optimizer.step(plan=...)``: stages 2, 4 and 5 of
    the pipeline (mask the gradient; mask the weight and its optimizer state; count sign flips),
    to run inside the optimizer's one-pass step, per managed tensor, in that order.

    Attributes:
        masks: parameter -> its bool mask.
        track: parameter -> its tracker state, on the steps the tracker compares signs (else empty).
    """

    masks: dict[Tensor, Tensor] = field(default_factory=dict)
    track: dict[Tensor, TrackState] = field(default_factory=dict)

    def tensors(self) -> list[Tensor]:
        """Every tensor the plan names, once."""
        return list({id(p): p for p in [*self.masks, *self.track]}.values())


@dataclass(frozen=True)
class GroupPlan:
    """What :class:`sparseham.HAM` asks of the one-pass step for one param group.

    Attributes:
        mirror: the mirror step's hyperparameters, or ``None`` (base step only).
        mirrored: the tensors that get the mirror step (HAM's ``min_ndim``).
        pre_sign: the mirror step uses ``sign(x_k)`` (HAM's ``sign="pre_step"``).
        degree: the polynomial ``exp``'s degree for HAM's clamp (``None``: ``torch.exp``).
        count: count the entries whose exponent reaches the clamp.
        cap: measure the mirrored tensors' norms for the norm cap.
        stages: the manager's masks and tracker state for this step.
    """

    mirror: Mirror | None
    mirrored: frozenset = frozenset()
    pre_sign: bool = False
    degree: int | None = None
    count: bool = False
    cap: bool = False
    stages: StepPlan = field(default_factory=StepPlan)
