"""MaskManager: the masks and the one per-step pipeline every method runs through.

The pipeline, in this order (one line each in :meth:`MaskManager.step`):

1. the method's pre-step hook (on a RigL update step it reads the dense gradient);
2. mask the gradients of pruned weights;
3. ``optimizer.step()``: the base step plus, when wrapped in :class:`sparseham.HAM`, the mirror step;
4. re-apply the masks to the weights, and mask the optimizer state by shape;
5. the sign-flip tracker (flips since its last update, split by the mask in force);
6. the method's post-step hook (topology updates).

Nothing here reads a device value on the host: when to act is decided from ``step_count``.

Where the optimizer offers a one-pass step (:class:`sparseham.HAM` over SGD, Adam or AdamW, see
``sparseham._step``, the engine room of the step), stages 2, 4 and 5 are handed to it as a
:class:`~sparseham._step.plan.StepPlan` (``optimizer.step(plan=...)``) and run in the same order
inside stage 3, in one pass per tensor; ``.grad`` then keeps the unmasked gradient. A step pre-hook
on the optimizer (it expects the masked gradient in ``.grad``), a tracker subclass with its own
``update`` and tracking masks that depend on the step's weights (STR's) keep their stages staged.

Resuming works in any order of loading the weights, building the manager and loading its state:
if the managed weights are already sparse when the manager is built (a loaded checkpoint), the
method's first masks wait until :meth:`MaskManager.load_state_dict` replaces them or the first
:meth:`MaskManager.step` applies them, instead of zeroing the loaded weights at once.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import _global_optimizer_pre_hooks

from . import sharding
from ._step import masking
from ._step.plan import StepPlan
from .method import Method
from .params import managed_summary, prunable_parameters, unwrap
from .stepping import PipelineOptimizer, already_unscaled
from .topk import nm_groups

__all__ = ["MaskManager", "MaskInvariantError", "prunable_parameters", "unwrap"]

# A fresh initialization has no exact zeros; more than this fraction means the weights were loaded
# from a sparse run.
_ALREADY_SPARSE = 0.01


def _like(mask: Tensor, p: Tensor) -> Tensor:
    """``mask`` as a bool tensor laid out like ``p``: on its device, or as its shards when ``p`` is
    sharded and the mask was built whole."""
    if sharding.is_sharded(p):
        return sharding.local_slice(mask.view(p.shape) if not sharding.is_sharded(mask) else mask, p).bool()
    return mask.to(device=p.device, dtype=torch.bool).view(p.shape)


class MaskInvariantError(RuntimeError):
    """A mask or a masked weight drifted from what the method asked for."""


class MaskManager:
    """Owns one bool mask per managed tensor and runs the per-step pipeline.

    Args:
        model: the model (a DDP wrapper is unwrapped).
        optimizer: the optimizer that steps the model, usually a :class:`sparseham.HAM`; ``None``
            to prune without training (one-shot pruning: the masks are set and applied, and
            :meth:`step` refuses).
        method: a :class:`sparseham.method.Method` instance, e.g. ``methods.get("rigl")(target=0.9)``.
        tracker: an optional :class:`sparseham.SignFlipTracker`.
        include, exclude: glob patterns over parameter names (see :func:`prunable_parameters`).
        total_steps: length of training, for methods whose schedule is relative to it.
        steps_per_epoch: for schedules given in epochs.
        data: batches ``(x, y)`` for methods that score with data at set-up (SNIP, GraSP).
        loss_fn: the loss used for such scoring (default cross-entropy).
        verbose: print one line on stderr saying what is managed (and what the defaults skipped:
            a language model's head, tied weights counted once).

    Call :meth:`step` where a plain loop calls ``optimizer.step()``; stepping the optimizer
    directly warns once (pruned weights would revive). To resume, any order works; the
    recommended one is PyTorch's: load the model's weights, build the manager, then
    ``mm.load_state_dict(state["manager"])`` and ``optimizer.load_state_dict(...)``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        method: Method,
        tracker: Any = None,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        *,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
        data: Iterable | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        verbose: bool = True,
    ) -> None:
        pairs = prunable_parameters(model, include, exclude)
        if not pairs:
            raise ValueError("MaskManager found no parameters to manage; check include/exclude globs")
        if verbose:
            print(f"sparseham: {managed_summary(model, include, exclude)}", file=sys.stderr, flush=True)
        self.model = unwrap(model)
        self.optimizer = optimizer
        self.method = method
        self.tracker = tracker
        self.names = [n for n, _ in pairs]
        self.params = [p for _, p in pairs]
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.data = data
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self.masks: list[Tensor] | None = None
        self._factors: list[Tensor] | None = None
        self.expected: list[int] | None = None
        self.step_count = 0
        self.mask_events: list[dict[str, Any]] = []
        self.phase: str | None = None
        self._inside = self._stepped = self._warned = self._warned_nonfinite = False
        #: Whether the last :meth:`step` was a topology-only iteration (RigL's reference update):
        #: an LR scheduler that follows optimizer steps should not step after it.
        self.topology_only = False
        if hasattr(optimizer, "name_parameters"):  # HAM: its diagnostics name layers as the model does
            optimizer.name_parameters({p: n for n, p in self.model.named_parameters()})
        if optimizer is not None:
            optimizer.register_step_pre_hook(self._before_optimizer_step)
            optimizer.register_step_post_hook(self._after_optimizer_step)
        # Masks wait (see the module docstring) when the weights arrive sparse: one host read, here.
        zeros = sum(int(p.numel() - torch.count_nonzero(p)) for p in self.params)
        self._pending = zeros > _ALREADY_SPARSE * sum(p.numel() for p in self.params)
        method.setup(self)
        self._warn_dense_under_pattern()
        if tracker is not None:
            tracker.attach(self.names, self.params, self.method.tracking_masks(self))

    def _warn_dense_under_pattern(self) -> None:
        pattern = getattr(self.method, "pattern", None)
        if not pattern:
            return
        dense = [name for name, p in zip(self.names, self.params) if not nm_groups(p.shape, pattern[1])]
        if dense:
            warnings.warn(
                f"pattern {pattern[0]}:{pattern[1]} leaves {', '.join(dense)} dense (fan-in not a multiple "
                f"of {pattern[1]}); the model ends at sparsity "
                f"{self.method.promised_sparsity(self):.4f}, not {self.method.target:g}", stacklevel=3)

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        if not self._inside and not self._warned:
            self._warned = True
            warnings.warn(
                "the optimizer was stepped outside MaskManager.step(): pruned weights' gradients "
                "were not masked and pruned weights can revive; call mm.step() in place of "
                "optimizer.step()", stacklevel=3)

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        self._stepped = True

    # -- the pipeline ---------------------------------------------------------------------------
    def step(self, closure: Callable[[], Tensor] | torch.amp.GradScaler | None = None, *,
             scaler: torch.amp.GradScaler | None = None, closure_first: bool = True) -> Tensor | None:
        """Run one training step of the pipeline (see the module docstring for the order).

        Args:
            closure: as for ``torch.optim``: re-evaluates the model and returns the loss; it is
                called first, to compute the gradients. A ``GradScaler`` given here is taken as
                ``scaler`` (``mm.step(scaler)``).
            closure_first: call the closure before the pipeline; ``False`` when the caller already
                ran the first backward pass and the closure only serves an optimizer that
                re-evaluates inside its step (:class:`sparseham.SAM`'s second pass).
            scaler: gradients are unscaled first, unless the caller already did
                (``scaler.unscale_(opt)`` before clipping), so hooks and HAM see true gradients;
                ``scaler.step`` skips the step when they are not finite, and then nothing moves:
                neither ``step_count``, nor the masks, the tracker or the method's schedule.
                Call ``scaler.update()`` after.

        Returns:
            The closure's loss, or ``None``.
        """
        if self.optimizer is None:
            raise RuntimeError("MaskManager.step(): this manager was built without an optimizer (for "
                               "pruning only); build it with the optimizer that trains the model")
        if isinstance(closure, torch.amp.GradScaler):
            closure, scaler = None, closure
        loss = None
        if closure is not None and closure_first:
            with torch.enable_grad():
                loss = closure()
        reevaluate = None
        if closure is not None and getattr(self.optimizer, "uses_closure", False):
            reevaluate = self._masked(closure)  # SAM's second pass, its gradient masked too
        if scaler is not None and not already_unscaled(scaler, self.optimizer):
            scaler.unscale_(self.optimizer)
        if self._pending:
            self._pending = False
            self.apply_masks_()
        self.method.pre_step(self)  # 1
        self.topology_only = not self.method.takes_optimizer_step(self)
        if self.topology_only:
            return loss  # pre_step installed the new masks; the optimizer does not step
        plan = self._plan(reevaluate is None)  # stages 2, 4, 5 in the optimizer's pass, or None: staged
        self._mask_grads(plan)  # 2
        if not self._optimizer_step(plan, reevaluate, scaler):  # 3
            self.method.skip_step(self)  # the scaler found inf or NaN and skipped the step
            return loss
        self.step_count += 1
        self._mask_weights(plan)  # 4
        self._track(plan)  # 5
        self.method.post_step(self)  # 6
        return loss

    def _masking(self) -> bool:
        return self.masks is not None and self.method.masking

    def _plan(self, plain: bool) -> StepPlan | None:
        """The stages to hand to the optimizer's one-pass step, or ``None`` when it does not take
        them (no one-pass step, a closure that re-evaluates, a hook watching ``.grad``)."""
        accepts = getattr(self.optimizer, "accepts", None)
        if accepts is None or not plain or self._observed():
            return None
        plan = StepPlan(masks=dict(zip(self.params, self.masks)) if self._masking() else {})
        # The tracker goes along only when its masks do not depend on this step's weights (STR's do).
        if self.tracker is not None and self.method.tracking_masks_fixed(self):
            states = self.tracker.in_pass_states(self.method.tracking_masks(self))
            plan.track = {} if states is None else dict(zip(self.params, states))
        return plan if accepts(plan) else None

    def _mask_grads(self, plan: StepPlan | None) -> None:
        if plan is None and self._masking():
            self.mask_grads_()

    def _optimizer_step(self, plan: StepPlan | None, reevaluate: Callable | None,
                        scaler: torch.amp.GradScaler | None) -> bool:
        """Stage 3; returns whether the optimizer stepped (a scaler skips non-finite steps)."""
        kwargs = {} if plan is None else {"plan": plan}
        self._inside, self._stepped = True, False
        try:
            if scaler is not None:
                scaler.step(self.optimizer, **kwargs)
            elif reevaluate is not None:
                self.optimizer.step(reevaluate)
            else:
                self.optimizer.step(**kwargs)
        finally:
            self._inside = False
        return self._stepped

    def _mask_weights(self, plan: StepPlan | None) -> None:
        if plan is None and self._masking():
            self.apply_masks_()

    def _track(self, plan: StepPlan | None) -> None:
        if self.tracker is None:
            return
        if plan is not None and plan.track:
            self.tracker.update(self.params, None, compared=True)  # the pass compared the signs
        else:
            self.tracker.update(self.params, self.method.tracking_masks(self))

    def _observed(self) -> bool:
        """Whether a step pre-hook other than ours watches the optimizer: it expects to see the
        masked gradients in ``.grad``, which only the staged pipeline writes there."""
        ours = self._before_optimizer_step
        return bool(_global_optimizer_pre_hooks) or any(
            h != ours for h in self.optimizer._optimizer_step_pre_hooks.values())

    def _masked(self, closure: Callable[[], Tensor]) -> Callable[[], Tensor]:
        def masked() -> Tensor:
            loss = closure()
            if self.masks is not None and self.method.masking:
                self.mask_grads_()
            return loss

        return masked

    def _state(self) -> dict:
        return {} if self.optimizer is None else self.optimizer.state

    def _refresh_factors(self) -> None:
        self._factors = None  # free the old factors before building the new ones
        self._factors = None if self.masks is None else masking.factors(self.masks, self.params)

    def mask_grads_(self) -> None:
        """Zero the gradients of pruned weights, in place."""
        masking.mask_grads_(self.params, self._factors)

    def apply_masks_(self) -> None:
        """Zero pruned weights and every optimizer-state tensor shaped like its weight."""
        masking.mask_weights_(self.params, self._factors, self._state())

    # -- mask changes (methods call these) ------------------------------------------------------
    def set_masks(
        self,
        masks: Sequence[Tensor],
        expected: Sequence[int] | int | None = None,
        reference: Sequence[Tensor] | None = None,
    ) -> None:
        """Install new masks, apply them, and record the churn (Hamming distance per layer).

        Args:
            masks: one bool tensor per managed parameter.
            expected: the kept counts the method intends, per layer, or one total for a global
                threshold; checked by :meth:`verify`.
            reference: the masks churn is measured against (default: the current masks).
        """
        if len(masks) != len(self.params):
            raise ValueError(f"expected {len(self.params)} masks, got {len(masks)}")
        new = [_like(m, p) for m, p in zip(masks, self.params)]
        reference = self.masks if reference is None else reference
        churn = None
        if reference is not None:
            # count_nonzero, not sum: a bool sum widens to int64 first, ~20x slower on CPU.
            churn = sharding.stack_counts([torch.count_nonzero(a ^ b) for a, b in zip(reference, new)])
        self.masks = new
        self._refresh_factors()
        self.expected = expected if expected is None or isinstance(expected, int) else list(expected)
        if not self._pending:
            self.apply_masks_()
        self.mask_events.append({"step": self.step_count, "churn": churn, "phase": self.phase})

    def clear_masks(self) -> None:
        """Drop the masks: every weight trains (AC/DC decompression, dense training)."""
        self.masks = None
        self._refresh_factors()
        self.expected = None
        self.mask_events.append({"step": self.step_count, "churn": None, "phase": self.phase})

    def zero_state_(self, where: Sequence[Tensor]) -> None:
        """Zero the optimizer-state entries of grown weights, in place.

        Args:
            where: per managed tensor, a bool mask or a tensor of flat indices.
        """
        masking.zero_state_(self.params, where, self._state())

    def reset_optimizer_state_(self) -> None:
        """Zero every optimizer-state tensor shaped like its parameter, for every parameter the
        optimizer holds (managed or not: BatchNorm and biases too); step counters stay."""
        if self.optimizer is not None:
            masking.reset_state_(self.optimizer.param_groups, self.optimizer.state)

    # -- measurements (host reads: call at log intervals only) ----------------------------------
    def kept(self) -> Tensor:
        """Per-layer count of kept weights, as one device tensor.

        With masks in force this is the mask size: the budget the method imposes (a kept weight
        may still be exactly zero, e.g. just grown). Without masks (dense, STR before it
        projects, AC/DC decompressed) it is the count of non-zero effective weights.
        """
        if self.masks is not None and self.method.masking:
            return sharding.stack_counts([torch.count_nonzero(m) for m in self.masks])
        return sharding.stack_counts([torch.count_nonzero(w) for w in self.method.effective_weights(self)])

    def zeros(self) -> Tensor:
        """Per-layer count of effective weights that are exactly zero, as one device tensor."""
        weights = self.method.effective_weights(self)
        nonzero = sharding.stack_counts([torch.count_nonzero(w) for w in weights])
        return torch.tensor([w.numel() for w in weights], device=nonzero.device) - nonzero

    def nonfinite(self) -> Tensor:
        """Per-layer count of managed weights that are NaN or inf, as one device tensor."""
        return sharding.stack_counts([torch.count_nonzero(~torch.isfinite(p)) for p in self.params])

    def _nonfinite_message(self, counts: Sequence[int]) -> str | None:
        bad = [(n, c, p.numel()) for n, c, p in zip(self.names, counts, self.params) if c]
        if not bad:
            return None
        name, count, numel = bad[0]
        more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
        return (f"{name}: {count} of {numel} weights are NaN or inf{more}, from a non-finite loss or "
                "gradient, not from the masks; lower the learning rate, clip the gradients, or skip "
                "non-finite steps (a GradScaler does)")

    def _kept_checked(self) -> list[int]:
        """Per-layer kept counts, read with the non-finite counts in one host read; a warning
        names the first layer holding NaN or inf (weights or masks no longer mean what they say)."""
        n = len(self.params)
        both = torch.cat([self.kept(), self.nonfinite().to(torch.int64)]).tolist()
        message = self._nonfinite_message(both[n:])
        if message is not None and not self._warned_nonfinite:
            warnings.warn(message, stacklevel=3)
        self._warned_nonfinite = message is not None
        return both[:n]

    def layer_sparsity(self) -> dict[str, float]:
        """Achieved sparsity of each managed tensor, ``1 - kept / numel`` (reads the device; warns
        once when a layer holds NaN or inf)."""
        kept = self._kept_checked()
        return {n: 1.0 - k / p.numel() for n, k, p in zip(self.names, kept, self.params)}

    def sparsity(self) -> float:
        """Achieved sparsity over all managed weights (reads the device; warns once when a layer
        holds NaN or inf)."""
        total = sum(p.numel() for p in self.params)
        return 1.0 - sum(self._kept_checked()) / total

    def verify(self) -> None:
        """Check masks against the method's counts and that pruned weights are zero.

        One device reduction; call it at log intervals, not per step. Raises
        :class:`MaskInvariantError` on any mismatch, and first when a managed weight is NaN or
        inf (then nothing about the masks can be checked, and they are not the cause).
        """
        if self.masks is None or not self.method.masking:
            return
        kept = [torch.count_nonzero(m) for m in self.masks]
        leaked = [torch.count_nonzero(p * ~m) for p, m in zip(self.params, self.masks)]
        bad = [torch.count_nonzero(~torch.isfinite(p)) for p in self.params]
        kept, leaked, bad = sharding.stack_counts(kept + leaked + bad).view(3, -1).tolist()
        message = self._nonfinite_message(bad)
        if message is not None:
            raise MaskInvariantError(message)
        want = self.expected if self.expected is not None else kept
        if isinstance(want, int):
            if sum(kept) != want:
                raise MaskInvariantError(
                    f"masks keep {sum(kept)} weights in all, the method asked for {want}"
                )
            want = kept
        for name, k, w, bad in zip(self.names, kept, want, leaked):
            if k != w:
                raise MaskInvariantError(f"{name}: mask keeps {k} weights, the method asked for {w}")
            if bad:
                raise MaskInvariantError(f"{name}: {bad} pruned weights are non-zero")

    def as_optimizer(self) -> PipelineOptimizer:
        """This manager as an optimizer whose ``step(closure)`` runs :meth:`step`, for frameworks
        that call ``optimizer.step()`` themselves (see :mod:`sparseham.stepping`)."""
        return PipelineOptimizer(self)

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Masks, step counter, the method's and tracker's state, and the mask changes not yet
        read (``mask_events``: a resumed run logs them as an uninterrupted one would)."""
        return {
            "mask_events": [dict(e) for e in self.mask_events],
            "names": list(self.names),
            "masks": None if self.masks is None else [m.clone() for m in self.masks],
            "expected": self.expected,
            "step_count": self.step_count,
            "phase": self.phase,
            "method": self.method.state_dict(),
            "tracker": None if self.tracker is None else self.tracker.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the names of the managed tensors must match."""
        if list(state["names"]) != self.names:
            raise ValueError("checkpoint masks were saved for other parameters than this model manages")
        self.method.load_state_dict(state["method"])
        self.step_count = state["step_count"]
        self.phase = state["phase"]
        masks = state["masks"]
        if masks is not None:
            masks = [_like(m, p) for m, p in zip(masks, self.params)]
        self.masks = masks
        self._refresh_factors()
        self.expected = state["expected"]
        if self.tracker is not None and state["tracker"] is not None:
            self.tracker.load_state_dict(state["tracker"])
        device = self.params[0].device
        self.mask_events[:] = [{**e, "churn": None if e["churn"] is None else e["churn"].to(device)}
                               for e in state.get("mask_events", [])]
        self._pending = False
        if self.masks is not None and self.method.masking:
            self.apply_masks_()  # a no-op on weights saved with these masks
