"""Driving the pipeline from an optimizer's ``step()``, for loops that own that call.

Frameworks such as the Hugging Face Trainer and Lightning call ``optimizer.step()`` (or
``scaler.step(optimizer)``) themselves. :meth:`MaskManager.as_optimizer` gives them a
:class:`PipelineOptimizer`, whose ``step(closure)`` is ``MaskManager.step(closure)``: the whole
pipeline in its fixed order, with ``param_groups`` and ``state`` shared with the manager's
optimizer (so LR schedulers, ``zero_grad`` and checkpoints work on it as usual).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.optim import Optimizer

if TYPE_CHECKING:
    from .masks import MaskManager

__all__ = ["PipelineOptimizer", "already_unscaled"]


class PipelineOptimizer(Optimizer):
    """An optimizer whose ``step`` runs a :class:`sparseham.MaskManager`'s pipeline.

    Args:
        manager: the manager; its ``optimizer`` (a :class:`sparseham.HAM`, or any optimizer) is
            stepped inside the pipeline, never directly.
    """

    def __init__(self, manager: MaskManager) -> None:
        self.manager = manager
        inner = manager.optimizer
        super().__init__(inner.param_groups, inner.defaults)
        self.param_groups, self.state = inner.param_groups, inner.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        inner = self.manager.optimizer
        if not any(param_group is g for g in inner.param_groups):
            inner.add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """``MaskManager.step(closure)``: the closure (if any), then the whole pipeline."""
        return self.manager.step(closure)

    def state_dict(self) -> dict[str, Any]:
        return self.manager.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inner = self.manager.optimizer
        inner.load_state_dict(state_dict)
        self.param_groups, self.state = inner.param_groups, inner.state


def already_unscaled(scaler: torch.amp.GradScaler, optimizer: Optimizer) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` already ran this iteration (clip-then-step recipe)."""
    from torch.amp.grad_scaler import OptState

    state = scaler._per_optimizer_states.get(id(optimizer)) if scaler.is_enabled() else None
    return state is not None and state["stage"] is OptState.UNSCALED
