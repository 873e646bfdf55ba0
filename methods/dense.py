"""Dense training: no masks, so HAM can be compared on dense networks as the paper does."""

from __future__ import annotations

from sparseham.method import Method

from . import register

__all__ = ["Dense"]


@register("dense")
class Dense(Method):
    """No sparsity: every weight trains; the tracker counts every flip as unmasked."""

    masking = False
    distributions = ("uniform", "er", "erk", "global")

    def __init__(self, target: float = 0.0, **kwargs) -> None:
        if target:
            raise ValueError(f"dense: target must be 0 (dense training prunes nothing), got {target}")
        super().__init__(0.0, **kwargs)
