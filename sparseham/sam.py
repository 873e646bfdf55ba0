r"""SAM: sharpness-aware minimization (Foret et al. 2021), and ASAM (Kwon et al. 2021), as a wrapper
of any base optimizer that composes with HAM: ``HAM(SAM(torch.optim.SGD(...), rho=0.05))``.

With the gradient :math:`g = \nabla f(x)` already in ``.grad`` (the first backward pass),
``step(closure)``

1. perturbs the weights to :math:`x + \epsilon`, with :math:`\epsilon = \rho\, g / \lVert g \rVert_2`
   (SAM) or :math:`\epsilon = \rho\, T^2 g / \lVert T g \rVert_2`, :math:`T = |x|` elementwise
   (ASAM, ``adaptive=True``), the norm over every parameter of every group;
2. calls ``closure()`` for the gradient at the perturbed point (the second pass);
3. restores :math:`x` and runs the base step with that gradient.

Under :class:`sparseham.MaskManager` (``mm.step(closure)``) the first gradient is masked before
step 1, so pruned weights are not perturbed (:math:`\epsilon = 0` there) and stay exactly zero, and
the closure's gradient is masked again before step 3. The sign-flip tracker runs after the whole
step, so it counts only the real step, never the perturbation.

Which gradient HAM's mirror step then sees is HAM's choice (``HAM(..., sam_gradient=...)``): the
gradient at the perturbed point, which is what the authors' wrapper sees around a SAM optimizer
(``.grad`` after the second pass), or the gradient at :math:`x`, kept here as :attr:`first_grads`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["SAM"]


class SAM(Optimizer):
    """Sharpness-aware minimization around ``optimizer`` (see the module docstring).

    Args:
        optimizer: the base optimizer, e.g. ``torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)``.
        rho: the radius of the perturbation (0.05 in the paper for CIFAR; ASAM uses larger, e.g. 0.5).
        adaptive: ASAM's scale-invariant perturbation.

    ``step`` needs a closure that recomputes the loss and its gradient (zero the gradients, forward,
    backward); the gradient of the first pass must be in ``.grad`` already. It shares
    ``param_groups`` and ``state`` with ``optimizer``.
    """

    uses_closure = True  # MaskManager.step(closure) hands the (masked) closure to step()

    def __init__(self, optimizer: Optimizer, rho: float = 0.05, *, adaptive: bool = False) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"SAM wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not rho > 0:
            raise ValueError(f"Invalid rho value: {rho}; must be > 0")
        self.optimizer, self.rho, self.adaptive = optimizer, float(rho), adaptive
        #: The first pass's gradients, per parameter, kept only when ``keep_first_grads`` is set
        #: (``HAM(..., sam_gradient="original")`` sets it): one more gradient's worth of memory.
        self.keep_first_grads = False
        self.first_grads: dict[Tensor, Tensor] = {}
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups, self.state = optimizer.param_groups, optimizer.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not any(param_group is g for g in self.optimizer.param_groups):
            self.optimizer.add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)
        self.param_groups, self.state = self.optimizer.param_groups, self.optimizer.state

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Perturb, re-evaluate with ``closure``, restore, and take the base step."""
        if closure is None:
            raise RuntimeError("SAM needs a closure that recomputes the loss and its gradient: "
                               "opt.step(closure), or mm.step(closure) under a MaskManager")
        params = self._params()
        grads = [p.grad for p in params]
        scaled = torch._foreach_mul(grads, [p.abs() for p in params]) if self.adaptive else grads
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(scaled)))
        eps = (torch._foreach_mul(scaled, [p.abs() for p in params]) if self.adaptive
               else torch._foreach_mul(grads, 1.0))
        torch._foreach_mul_(eps, self.rho / (norm + 1e-12))  # a device scalar: no host read
        self.first_grads = {p: g.clone() for p, g in zip(params, grads)} if self.keep_first_grads else {}
        torch._foreach_add_(params, eps)
        with torch.enable_grad():
            loss = closure()
        torch._foreach_sub_(params, eps)
        self.optimizer.step()
        return loss
