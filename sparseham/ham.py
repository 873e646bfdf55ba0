r"""HAM: Hyperbolic Aware Minimization (Jacobs, Gadhikar, Rubio-Madrigal, Burkholz; arXiv 2506.02630).

HAM alternates any optimizer step with a cheap hyperbolic mirror step (HAM Alg. 1):

.. math::
    x_{k+1/2} &= \mathrm{OptStep}(x_k, \nabla f(x_k)) \\
    x_{k+1}   &= x_{k+1/2} \odot \exp\big(\mathrm{clamp}(
                 -\eta(\alpha\,\mathrm{sign}(s)\odot\nabla f(x_k) + \beta), -c, c)\big)

with :math:`s = x_{k+1/2}` (``sign="half_step"``, the paper's HYP*) or :math:`s = x_k`
(``sign="pre_step"``, HYP). To first order this is the flow
:math:`\dot x = -(1 + \alpha|x|)\nabla f(x) - \beta x`: faster movement away from zero, which makes
sign flips easier.

The clamp at :math:`\pm c` is a trust region on the multiplicative step: one step scales a weight
by at most :math:`e^{\pm c}`. The first-order flow's effective learning rate :math:`\eta(1 +
\alpha|x|)` grows with :math:`|x|`, so a weight that grew gets a larger step and grows faster; the
official code's clip at :math:`\pm 5` (a factor of up to 148 per step) does not stop that runaway,
and at the paper's :math:`\alpha = 200` un-normalised networks here collapse to chance. The default
:math:`c = 0.02` comes from the HAM-robustness study (``docs/study/ham_clamp``): on every method
and sparsity tried, no collapse at :math:`\alpha` from 20 to 1000, and the largest mean gain at
:math:`\alpha = 200`. Where HAM moves weights gently (:math:`\eta\alpha|g| < c`, the paper's
ImageNet regime) the clamp is inactive and the step is exactly HAM's; ``clamp=5.0`` reproduces the
authors' code.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import sharding
from ._step import one_pass
from ._step.mirror import cap_norms_, exp_poly_degree, ham, rescale_
from ._step.plan import GroupPlan, Mirror, StepPlan

__all__ = ["HAM", "ham"]  # ham: the functional mirror step (sparseham._step.mirror)

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
        clamp: the trust region: the exponent is clipped to ``[-clamp, clamp]``, so one step
            scales a weight by at most :math:`e^{\pm clamp}` (default 0.02, from the
            HAM-robustness study; 5.0 is the authors' code). :meth:`diagnostics` says how often
            it was active.
        max_norm: after the mirror step, every mirrored tensor whose L2 norm exceeds ``max_norm`` is
            rescaled to it, on the device. This is the authors' guard against overflow: with
            ``alpha * lr`` large, factors of up to :math:`e^{clamp}` per step overflow float32 within a
            few dozen steps. ``None`` disables it. The cap is a pass of its own (about 0.8x an SGD
            step here: two reads to measure and one read-modify-write). The one-pass step measures
            in its own pass, which leaves the multiply; on CPU only the tensors over the cap are
            multiplied (the host reads the scales there without a sync; on a GPU every tensor is
            multiplied by its scale, 1 or less, to keep the step free of syncs). Not applied one
            step late from those norms (issue 16's other option): a tensor would exceed
            ``max_norm`` for a step, and the one-pass and staged results would differ.
        min_ndim: only tensors with ``ndim >= min_ndim`` get the mirror step (biases and norm layers
            are left alone).
        foreach: the staged mirror step's multi-tensor ``torch._foreach_*`` path (the default when
            the one-pass step does not apply); ``False``: a for-loop over tensors.
        fused: ``None`` (auto, the default) runs the *one-pass step* where it applies: base step,
            mirror step and, inside :meth:`sparseham.MaskManager.step`, the masks and the sign-flip
            tracker in one compiled pass per tensor (``sparseham._step.one_pass``; SGD, Adam and
            AdamW, see its ``unsupported`` for the conditions; the first step compiles, seconds on CPU).
            Elsewhere it runs the staged path: the base optimizer's own step, then the mirror step.
            ``True``: the same, and the staged mirror step as one compiled pass per tensor, with a
            warning saying why the one-pass step does not apply. ``False``: always staged, eager.
        sam_gradient: around a :class:`sparseham.SAM` base, the gradient the mirror step uses:
            ``"perturbed"`` (the default: the gradient at the perturbed point, what the authors'
            wrapper sees around a SAM optimizer, since ``.grad`` holds it after SAM's second pass)
            or ``"original"`` (the gradient at x, from SAM's first pass).
        diagnostics: every this many steps, count on the device the entries whose exponent
            reaches the clamp (read with :meth:`diagnostics`, which reports the fraction over the
            counted steps); ``0`` never counts. The count is a reduction over every weight, so
            sampling 1 step in 10 keeps its cost near 0.05x an SGD step (benchmarks/ham_step.py).

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
        clamp: float = 0.02,
        max_norm: float | None = 1000.0,
        min_ndim: int = 2,
        foreach: bool | None = None,
        fused: bool | None = None,
        diagnostics: int = 10,
        sam_gradient: str = "perturbed",
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
        if sam_gradient not in ("perturbed", "original"):
            raise ValueError(f"Invalid sam_gradient: {sam_gradient!r}; choose 'perturbed' or 'original'")
        if isinstance(diagnostics, bool) or not isinstance(diagnostics, int) or diagnostics < 0:
            raise ValueError(f"Invalid diagnostics value: {diagnostics!r}; an int >= 0 (count every N steps)")
        self.optimizer = optimizer
        clash = {"alpha", "beta"} & set(optimizer.defaults)
        self._keys = ("ham_alpha", "ham_beta") if clash else ("alpha", "beta")
        self.sign, self.clamp, self.max_norm, self.min_ndim = sign, float(clamp), max_norm, min_ndim
        self.foreach, self.fused, self.diagnostics_every = foreach, fused, diagnostics
        self.sam_gradient = sam_gradient
        if sam_gradient == "original" and hasattr(optimizer, "keep_first_grads"):
            optimizer.keep_first_grads = True
        self._calls = 0  # host-side: which steps count the clamped entries
        self._names: dict[Tensor, str] = {}
        self._warned_staged = False
        # The base's defaults too: schedulers such as OneCycleLR and CyclicLR look for
        # "momentum" or "betas" there.
        defaults = {**optimizer.defaults, self._keys[0]: float(alpha), self._keys[1]: float(beta)}
        # Optimizer.__init__ registers the base's groups through our add_param_group, which only
        # fills in missing keys; afterwards both objects point at the same groups and state.
        super().__init__(optimizer.param_groups, defaults)
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        # Diagnostics, per mirrored tensor, on its device: entries whose exponent reached the
        # clamp and times the norm cap rescaled it, since the last read; and mirror steps taken.
        self._hits: dict[Tensor, Tensor] = {}
        self._caps: dict[Tensor, Tensor] = {}
        self._steps: dict[Tensor, int] = {}
        self._counted: dict[Tensor, int] = {}

    @property
    def uses_closure(self) -> bool:
        """Whether the base optimizer re-evaluates a closure inside its step (SAM does)."""
        return getattr(self.optimizer, "uses_closure", False)

    @property
    def group_keys(self) -> tuple[str, str]:
        """The param-group keys of HAM's alpha and beta: ``("alpha", "beta")``, or
        ``("ham_alpha", "ham_beta")`` over an optimizer that uses those names itself (RMSprop)."""
        return self._keys

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        if not any(param_group is g for g in self.optimizer.param_groups):
            self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict, plus under ``"ham"`` the diagnostics since their last
        read and the step counter that picks the counted steps, so that a resumed run reports
        what an uninterrupted one does (per tensor, in the order of the param groups)."""
        state = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        state["ham"] = {"calls": self._calls, "tensors": {
            i: {"hits": self._hits[p].clone(), "caps": self._caps[p].clone(), "steps": self._steps.get(p, 0),
                "counted": self._counted.get(p, 0)} for i, p in enumerate(params) if p in self._hits}}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ours = state_dict.get("ham")
        self.optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != "ham"})
        # The base rebinds its groups and state on load: follow them.
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        if ours is None:  # a checkpoint of the base optimizer alone
            return
        params = [p for group in self.param_groups for p in group["params"]]
        self._calls = ours["calls"]
        self._hits, self._caps, self._steps, self._counted = {}, {}, {}, {}
        for i, entry in ours["tensors"].items():
            p = params[int(i)]
            self._hits[p] = entry["hits"].to(p.device)
            self._caps[p] = entry["caps"].to(p.device)
            self._steps[p], self._counted[p] = entry["steps"], entry["counted"]

    def _mirrored(self, group: dict[str, Any]) -> list[Tensor]:
        return [p for p in group["params"] if p.ndim >= self.min_ndim]

    def one_pass_blocker(self) -> str | None:
        """Why the next :meth:`step` runs staged rather than as the one-pass step (``None``: one pass)."""
        if self.fused is False or self.foreach is not None:
            return "fused=False" if self.fused is False else "foreach chosen"
        why = one_pass.unsupported(self.optimizer)
        if why is not None and self.fused and not self._warned_staged:
            self._warned_staged = True
            warnings.warn(f"HAM(fused=True): the one-pass step does not apply ({why}); the base step runs "
                          "on its own and the mirror step as one compiled pass", stacklevel=3)
        return why

    def accepts(self, plan: StepPlan) -> bool:
        """For :class:`sparseham.MaskManager`: whether the next ``step(plan=plan)`` can run the
        plan's stages (masks, sign-flip tracker) inside the one-pass step: it applies, and every
        tensor the plan names is one of this optimizer's, with a gradient."""
        params = {id(p) for g in self.param_groups for p in g["params"]}
        return self.one_pass_blocker() is None and all(
            id(p) in params and p.grad is not None for p in plan.tensors())

    def _counting(self) -> bool:
        """Whether this step counts the clamped entries (every ``diagnostics``-th)."""
        every, self._calls = self.diagnostics_every, self._calls + 1
        return every > 0 and self._calls % every == 0

    @torch.no_grad()
    def step(self, closure=None, *, plan: StepPlan | None = None):  # type: ignore[override]
        """Run the base step, then the mirror step on every tensor with ``ndim >= min_ndim``.

        Args:
            closure: as for ``torch.optim``.
            plan: from :class:`sparseham.MaskManager` (checked with :meth:`accepts`): its masks and
                tracker update run inside the one-pass step, in the pipeline's order.
        """
        if plan is not None and not self.accepts(plan):
            raise ValueError("HAM.step(plan=...): this step cannot run the plan's stages "
                             f"({self.one_pass_blocker() or 'a planned tensor has no gradient here'}); "
                             "check HAM.accepts(plan) first")
        if plan is not None or self.one_pass_blocker() is None:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self._one_pass(plan or StepPlan())
            return loss
        pre_signs = None
        if self.sign == "pre_step":
            # HYP needs sign(x_k): snapshot it before the base step moves the weights.
            pre_signs = [torch._foreach_sign(self._mirrored(g)) for g in self.param_groups]
        if closure is None:
            loss = self.optimizer.step()
        else:
            loss = self.optimizer.step(closure)
        key_a, key_b = self._keys
        count = self._counting()
        for i, group in enumerate(self.param_groups):
            alpha, beta = group[key_a], group[key_b]
            if alpha == 0 and beta == 0:
                continue  # exactly the base optimizer
            params = self._mirrored(group)
            keep = [j for j, p in enumerate(params) if p.grad is not None]
            if not keep:
                continue
            stepped = [params[j] for j in keep]
            first = getattr(self.optimizer, "first_grads", None) if self.sam_gradient == "original" else None
            grads = [first.get(p, p.grad) for p in stepped] if first else [p.grad for p in stepped]
            signs = [pre_signs[i][j] for j in keep] if pre_signs is not None else None
            # Sharded weights (FSDP2): the step is element-wise, so each rank mirrors its own shard
            # as plain tensors; only the norm cap needs whole-tensor norms (DTensor reduces them).
            sharded = any(sharding.is_sharded(p) for p in stepped)
            targets = stepped
            if sharded:
                targets, grads = [sharding.local(p) for p in stepped], [sharding.local(g) for g in grads]
                signs = None if signs is None else [sharding.local(t) for t in signs]
            hits, caps = ham(
                targets,
                grads,
                signs,
                lr=group["lr"],
                alpha=alpha,
                beta=beta,
                clamp=self.clamp,
                max_norm=None if sharded else self.max_norm,
                foreach=self.foreach,
                fused=self.fused,
                count=count,
            )
            if sharded and self.max_norm is not None:
                caps = [sharding.local(c) for c in cap_norms_(stepped, self.max_norm)]
            self._count(stepped, hits, caps)
        return loss

    def _one_pass(self, stages: StepPlan) -> None:
        """The one-pass step (``sparseham._step.one_pass``) for every tensor with a stage to fuse,
        then the norm cap; torch's own step for the rest (1-D tensors, unmanaged ones)."""
        key_a, key_b = self._keys
        count, degree = self._counting(), exp_poly_degree(self.clamp)
        managed = {id(p) for p in stages.tensors()}
        plans, rest = [], []
        for group in self.param_groups:
            alpha, beta = group[key_a], group[key_b]
            mirror = None if alpha == 0 and beta == 0 else Mirror(group["lr"], alpha, beta, self.clamp)
            mirrored = frozenset(p for p in self._mirrored(group) if mirror and p.grad is not None)
            stepped = [p for p in group["params"] if p.grad is not None]
            fused = [p for p in stepped if p in mirrored or id(p) in managed]
            rest += [p for p in stepped if not (p in mirrored or id(p) in managed)]
            plans.append((group, fused, GroupPlan(mirror, mirrored, pre_sign=self.sign == "pre_step",
                                                  degree=degree, count=count, cap=self.max_norm is not None,
                                                  stages=stages)))
        if rest:
            with one_pass.base_step_only(self.optimizer, rest):
                self.optimizer.step()
        for group, fused, plan in plans:
            hits, norms = one_pass.step_group(self.optimizer, group, fused, plan)
            stepped = [p for p in self._mirrored(group) if p in plan.mirrored]
            if stepped:
                caps = self._cap(stepped, norms, self.max_norm)
                self._count(stepped, [hits[p] for p in stepped] if count else [], caps)

    @staticmethod
    def _cap(params: list[Tensor], norms: dict[Tensor, Tensor], max_norm: float | None) -> list[Tensor]:
        """The norm cap after the one-pass step, from the norms its pass measured: one multiply pass
        on a GPU, none on CPU unless a tensor is over the cap (:func:`rescale_`; the eager cap also
        reads every tensor twice to measure). After the masks, where the staged path caps before
        them: pruned entries are zero either way, so the norms agree."""
        if max_norm is None:
            return []
        measured = torch.stack([norms[p] if p in norms else p.new_zeros(2) for p in params])
        return rescale_(params, measured[:, 0], measured[:, 1], max_norm)

    def _count(self, params: list[Tensor], hits: list[Tensor], caps: list[Tensor]) -> None:
        for p in params:
            if p not in self._hits:
                self._hits[p] = torch.zeros((), dtype=torch.int64, device=p.device)
                self._caps[p] = torch.zeros((), dtype=torch.int64, device=p.device)
            self._steps[p] = self._steps.get(p, 0) + 1
        if hits:
            torch._foreach_add_([self._hits[p] for p in params], hits)
            for p in params:
                self._counted[p] = self._counted.get(p, 0) + 1
        if caps:
            torch._foreach_add_([self._caps[p] for p in params], caps)

    def name_parameters(self, names: Mapping[Tensor, str]) -> None:
        """Name the parameters in :meth:`diagnostics` (``{parameter: "fc1.weight", ...}``)."""
        self._names = dict(names)

    def _default_names(self) -> dict[Tensor, str]:
        names = {}
        for g, group in enumerate(self.param_groups):
            given = group.get("param_names") or [None] * len(group["params"])
            for j, (p, name) in enumerate(zip(group["params"], given)):
                names[p] = self._names.get(p) or name or f"{g}.{j}"
        return names

    def diagnostics(self, names: Mapping[Tensor, str] | None = None, *, reset: bool = True) -> dict[str, Any]:
        """What the mirror step did since the last read (reads the device: call at log intervals).

        Args:
            names: parameter -> name, for the per-layer entries (default: the names given to
                :meth:`name_parameters`, which :class:`sparseham.MaskManager` calls with the model's
                own, or the param groups' ``param_names`` (``SGD(model.named_parameters())``), else
                ``"group.index"``).
            reset: start counting anew after this read.

        Returns:
            ``clamped_fraction``: the fraction of mirrored entries, over the counted steps since
            the last read (every ``diagnostics``-th), whose exponent reached ``±clamp`` (the
            trust region was active), with its numerator ``clamped`` and denominator ``entries``
            (0 when no step was counted);
            ``capped``: how many times the norm cap rescaled a tensor; ``steps``: the most mirror
            steps any tensor took; ``layers``: ``{name: {"clamped_fraction", "capped"}}``.
        """
        params = list(self._hits)
        if not params:
            return {"clamped_fraction": 0.0, "clamped": 0, "entries": 0, "capped": 0, "steps": 0,
                    "layers": {}}
        if names is None:
            names = self._default_names()
        home = params[0].device  # one host read, even when the tensors live on several devices
        counts = torch.stack([torch.stack([self._hits[p], self._caps[p]]).to(home) for p in params])
        shard = next((p for p in params if sharding.is_sharded(p)), None)
        if shard is not None:  # per-shard counts: a collective, every rank reads the diagnostics
            hits = sharding.sum_over_ranks(counts[:, 0], shard)
            counts = torch.stack([hits, counts[:, 1]], dim=1)  # a cap flag is already whole-tensor
        counts = counts.tolist()
        layers, hit_total, entries = {}, 0, 0
        for p, (hits, caps) in zip(params, counts):
            seen = self._counted.get(p, 0) * p.numel()
            layers[names.get(p, str(len(layers)))] = {"clamped_fraction": hits / seen if seen else 0.0,
                                                       "capped": caps}
            hit_total, entries = hit_total + hits, entries + seen
        out = {"clamped_fraction": hit_total / entries if entries else 0.0, "clamped": hit_total,
               "entries": entries,
               "capped": sum(c for _, c in counts),
               "steps": max(self._steps.values()), "layers": layers}
        if reset:
            self._hits, self._caps, self._steps, self._counted = {}, {}, {}, {}
        return out
