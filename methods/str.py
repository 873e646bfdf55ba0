r"""STR: Soft Threshold weight Reparameterization (Kusupati et al. 2020).

Each managed layer computes its forward weight from a latent :math:`W` and one learnable scalar
:math:`s_l`:

.. math::  \hat W = \mathrm{sign}(W) \odot \mathrm{ReLU}(|W| - \sigma(s_l)),

through ``torch.nn.utils.parametrize`` (so it works on any Conv/Linear module, including
torchvision's). The :math:`s_l` sit in their own parameter group with their own weight decay;
weight decay pulls :math:`s_l` towards 0, raising the threshold :math:`\sigma(s_l)` and with it the
sparsity. HAM acts on the latent :math:`W` (the :math:`s_l` are 0-dimensional, so the mirror step
skips them). The implicit mask is :math:`|W| > \sigma(s_l)`; the sign-flip tracker splits by it.

STR alone cannot be steered to a chosen sparsity. ``mode: target`` (the default) makes it end at
exactly ``sparsity.target``: at ``project_at`` (a fraction of training) the effective weights
:math:`\hat W` are projected onto the target with one global magnitude threshold, which keeps the
per-layer allocation STR learned, and the rest of training fine-tunes with that mask fixed.
``mode: free`` is the paper's STR: it ends wherever the thresholds took it. Either way the saved
weights are the effective sparse weights and the mask matches them.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparseham.method import Method

from . import register
from ._common import magnitude_masks

__all__ = ["STR", "SoftThreshold"]


class SoftThreshold(nn.Module):
    """``sign(w) * relu(|w| - sigmoid(s))`` with a learnable scalar ``s``."""

    def __init__(self, s_init: float) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor(float(s_init)))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.sign(w) * torch.relu(w.abs() - torch.sigmoid(self.s))


@dataclasses.dataclass
class STROptions:
    s_init: float = dataclasses.field(
        default=-5.0, metadata={"help": "initial threshold parameter s (sigmoid(s) is the threshold)"}
    )
    s_weight_decay: float = dataclasses.field(
        default=1e-4, metadata={"help": "weight decay of the threshold parameters (drives sparsity up)"}
    )
    mode: str = dataclasses.field(
        default="target",
        metadata={"help": "target: project to sparsity.target at project_at; free: plain STR"},
    )
    project_at: float = dataclasses.field(
        default=0.9,
        metadata={"help": "fraction of training at which target mode projects and freezes the mask"},
    )

    def __post_init__(self):
        if self.mode not in ("target", "free"):
            raise ValueError(f"mode must be target or free, got {self.mode!r}")
        if not 0.0 < self.project_at <= 1.0:
            raise ValueError(f"project_at must be in (0, 1], got {self.project_at}")
        if self.s_weight_decay < 0:
            raise ValueError(f"s_weight_decay must be >= 0, got {self.s_weight_decay}")


def _owner(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


@register("str")
class STR(Method):
    """Soft threshold reparameterization (see the module docstring)."""

    Options = STROptions
    distributions = ("uniform", "er", "erk")
    masking = False

    def setup(self, manager) -> None:
        if self.options.mode == "target" and manager.total_steps is None:
            raise ValueError("str: target mode needs the length of training: MaskManager(..., total_steps=N)")
        self.modules = []
        for name in manager.names:
            if not name.endswith("weight"):
                raise ValueError(f"str: can only reparameterize module weights, got {name!r}")
            module = _owner(manager.model, name)
            parametrize.register_parametrization(module, "weight", SoftThreshold(self.options.s_init))
            self.modules.append(module)
        thresholds = [m.parametrizations.weight[0].s for m in self.modules]
        manager.optimizer.add_param_group({"params": thresholds, "weight_decay": self.options.s_weight_decay})
        self.projected = False
        self.project_step = (
            round(self.options.project_at * manager.total_steps) if self.options.mode == "target" else None
        )

    def _implicit_masks(self) -> list[torch.Tensor]:
        return [
            m.parametrizations.weight.original.detach().abs()
            > torch.sigmoid(m.parametrizations.weight[0].s.detach())
            for m in self.modules
        ]

    def tracking_masks(self, manager):
        return manager.masks if self.projected else self._implicit_masks()

    def effective_weights(self, manager):
        return manager.params if self.projected else [m.weight.detach() for m in self.modules]

    def post_step(self, manager) -> None:
        if not self.projected and manager.step_count == self.project_step:
            self._bake(manager)
            masks, expected = magnitude_masks(
                manager, manager.params, self.target, "global", self.dense_layers, self.layer_density
            )
            self.masking = True
            manager.set_masks(masks, expected=expected)

    def finalize(self, manager) -> None:
        if not self.projected:
            self._bake(manager)
            manager.set_masks([p.detach() != 0 for p in manager.params])

    def _bake(self, manager) -> None:
        """Replace each latent weight by its effective sparse weight and drop the reparameterization."""
        with torch.no_grad():
            for module in self.modules:
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        self.projected = True

    def state_dict(self):
        return {"projected": self.projected}

    def load_state_dict(self, state) -> None:
        if state["projected"] and not self.projected:
            self._bake(None)
            self.masking = True
