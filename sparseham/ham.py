r"""HAM: Hyperbolic Aware Minimization (Jacobs, Gadhikar, Rubio-Madrigal, Burkholz; arXiv 2506.02630).

HAM alternates any optimizer step with a cheap hyperbolic mirror step (HAM Alg. 1):

.. math::
    x_{k+1/2} &= \mathrm{OptStep}(x_k, \nabla f(x_k)) \\
    x_{k+1}   &= x_{k+1/2} \odot \exp\big(\mathrm{clamp}(
                 -\eta(\alpha\,\mathrm{sign}(s)\odot\nabla f(x_k) + \beta), -c, c)\big)

with :math:`s = x_{k+1/2}` (``sign="half_step"``, the paper's HYP*) or :math:`s = x_k`
(``sign="pre_step"``, HYP). To first order this is the flow
:math:`\dot x = -(1 + \alpha|x|)\nabla f(x) - \beta x`: faster movement away from zero, which makes
sign flips easier. The clamp at :math:`\pm c` is the official code's safety clip; the paper has none.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["HAM", "ham"]

_SIGNS = ("half_step", "pre_step")


class HAM(Optimizer):
    r"""Wrap ``optimizer`` so that every ``step()`` is followed by the hyperbolic mirror step.

    The wrapper shares ``param_groups`` and ``state`` with the wrapped optimizer, so LR
    schedulers, ``zero_grad``, ``add_param_group``, ``state_dict`` and ``load_state_dict`` behave as
    usual, and step hooks registered on the wrapper run around the whole HAM step.

    Args:
        optimizer: the base optimizer (SGD, Adam, AdamW, or any ``torch.optim.Optimizer``).
        alpha: strength of the hyperbolic term; negative values are allowed (they flatten the
            geometry instead). Per-group overrides use the group key ``"alpha"``.
        beta: multiplicative shrink rate, applied as :math:`e^{-\eta\beta}` per step. Group key ``"beta"``.
            If the base optimizer already uses ``alpha``/``beta`` as group keys (RMSprop), HAM's
            keys are ``"ham_alpha"``/``"ham_beta"`` instead.
        sign: ``"half_step"`` (HYP*, no extra memory) or ``"pre_step"`` (HYP, keeps sign(x_k) for
            the duration of the step).
        clamp: the exponent is clipped to ``[-clamp, clamp]``, so one step scales a weight by at
            most :math:`e^{clamp}`.
        max_norm: after the mirror step, every mirrored tensor whose L2 norm exceeds ``max_norm`` is
            rescaled to it, on the device. This is the authors' guard against overflow: with
            ``alpha * lr`` large, factors of up to :math:`e^{clamp}` per step overflow float32 within a
            few dozen steps. ``None`` disables it (one pass over the weights cheaper).
        min_ndim: only tensors with ``ndim >= min_ndim`` get the mirror step (biases and norm layers
            are left alone).
        foreach: use the multi-tensor ``torch._foreach_*`` path (default when ``fused`` is off).
        fused: one compiled pass per tensor (``torch.compile``), compiled once per parameter layout.

    The exponent sees the raw gradient ``p.grad`` of the backward pass (not Adam's direction).
    Exact zeros stay zero, and a non-finite gradient leaves the weight as the base step left it.

    Example:
        >>> opt = HAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), alpha=200.0, beta=1e-3)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        alpha: float = 200.0,
        beta: float = 1e-3,
        *,
        sign: str = "half_step",
        clamp: float = 5.0,
        max_norm: float | None = 1000.0,
        min_ndim: int = 2,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"HAM wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if sign not in _SIGNS:
            raise ValueError(f"Invalid sign: {sign!r}; choose 'half_step' (HYP*) or 'pre_step' (HYP)")
        if not clamp > 0:
            raise ValueError(f"Invalid clamp value: {clamp}; must be > 0")
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"Invalid max_norm value: {max_norm}; must be > 0 or None")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        self.optimizer = optimizer
        clash = {"alpha", "beta"} & set(optimizer.defaults)
        self._keys = ("ham_alpha", "ham_beta") if clash else ("alpha", "beta")
        self.sign, self.clamp, self.max_norm, self.min_ndim = sign, float(clamp), max_norm, min_ndim
        self.foreach, self.fused = foreach, fused
        defaults = {self._keys[0]: float(alpha), self._keys[1]: float(beta)}
        # Optimizer.__init__ registers the base's groups through our add_param_group, which only
        # fills in HAM's keys; afterwards both objects point at the same groups and state.
        super().__init__(optimizer.param_groups, defaults)
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        if not any(param_group is g for g in self.optimizer.param_groups):
            self.optimizer.add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)
        # The base rebinds its groups and state on load: follow them.
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def _mirrored(self, group: dict[str, Any]) -> list[Tensor]:
        return [p for p in group["params"] if p.ndim >= self.min_ndim]

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Run the base step, then the mirror step on every tensor with ``ndim >= min_ndim``."""
        pre_signs = None
        if self.sign == "pre_step":
            # HYP needs sign(x_k): snapshot it before the base step moves the weights.
            pre_signs = [torch._foreach_sign(self._mirrored(g)) for g in self.param_groups]
        if closure is None:
            loss = self.optimizer.step()
        else:
            loss = self.optimizer.step(closure)
        key_a, key_b = self._keys
        for i, group in enumerate(self.param_groups):
            alpha, beta = group[key_a], group[key_b]
            if alpha == 0 and beta == 0:
                continue  # exactly the base optimizer
            params = self._mirrored(group)
            keep = [j for j, p in enumerate(params) if p.grad is not None]
            if not keep:
                continue
            ham(
                [params[j] for j in keep],
                [params[j].grad for j in keep],
                [pre_signs[i][j] for j in keep] if pre_signs is not None else None,
                lr=group["lr"],
                alpha=alpha,
                beta=beta,
                clamp=self.clamp,
                max_norm=self.max_norm,
                foreach=self.foreach,
                fused=self.fused,
            )
        return loss


def ham(
    params: list[Tensor],
    grads: list[Tensor],
    signs: list[Tensor] | None = None,
    *,
    lr: float | Tensor,
    alpha: float,
    beta: float,
    clamp: float = 5.0,
    max_norm: float | None = None,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    r"""Functional mirror step, in place: ``p *= exp(clamp(-lr*(alpha*sign(s)*g + beta), -c, c))``.

    Args:
        params: tensors after the base step (:math:`x_{k+1/2}`), updated in place.
        grads: the raw gradients :math:`\nabla f(x_k)`.
        signs: the tensors whose sign is used (``None``: ``params`` themselves, HYP*).
        lr, alpha, beta, clamp, max_norm: see :class:`HAM`.
        foreach, fused: implementation choice; the default is foreach.
    """
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if signs is None:
        signs = params
    hyper = {"lr": lr, "alpha": alpha, "beta": beta, "clamp": clamp, "max_norm": max_norm}
    if fused:
        from ._fused import fused_ham

        fused_ham(params, grads, signs, **hyper)
    elif foreach is False:
        _single_tensor_ham(params, grads, signs, **hyper)
    else:
        _multi_tensor_ham(params, grads, signs, **hyper)


def _single_tensor_ham(params, grads, signs, *, lr, alpha, beta, clamp, max_norm) -> None:
    for p, g, s in zip(params, grads, signs):
        e = torch.sign(s).mul_(g).mul_(-lr * alpha)
        if beta != 0:
            e.sub_(lr * beta)
        # NaN (from a NaN gradient, or 0 * inf) means "no information": factor 1.
        e.nan_to_num_(nan=0.0).clamp_(-clamp, clamp)
        p.mul_(e.exp_())
        if max_norm is not None:
            cap_norms_([p], max_norm)


def _multi_tensor_ham(params, grads, signs, *, lr, alpha, beta, clamp, max_norm) -> None:
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, signs])
    for (dev_params, dev_grads, dev_signs), _ in grouped.values():
        e = torch._foreach_sign(dev_signs)
        torch._foreach_mul_(e, dev_grads)
        torch._foreach_mul_(e, -lr * alpha)
        if beta != 0:
            torch._foreach_add_(e, -lr * beta)
        for t in e:  # there is no foreach nan_to_num; one fused clamp per tensor in the same loop
            t.nan_to_num_(nan=0.0).clamp_(-clamp, clamp)
        torch._foreach_exp_(e)
        torch._foreach_mul_(dev_params, e)
        if max_norm is not None:
            cap_norms_(dev_params, max_norm)


def cap_norms_(tensors: list[Tensor], max_norm: float) -> None:
    """Rescale, in place and on the device, every tensor whose L2 norm exceeds ``max_norm``."""
    norms = torch.stack(torch._foreach_norm(tensors))
    # Squares overflow float32 once entries pass ~1.8e19 and the norm becomes inf; max|t| * sqrt(n)
    # bounds the norm and still caps then (a float64 norm would do too, at ~7x the cost on CPU).
    peaks = torch.stack([torch.maximum(-lo, hi) * math.sqrt(t.numel()) for t in tensors for lo, hi in
                         [torch.aminmax(t)]])
    bound = torch.where(torch.isfinite(norms), norms, peaks)
    # A NaN or inf entry makes the bound non-finite: leave that tensor alone rather than spread it.
    scale = torch.where(torch.isfinite(bound), torch.clamp(max_norm / bound, max=1.0), 1.0)
    torch._foreach_mul_(tensors, list(scale.to(tensors[0].dtype).unbind()))
