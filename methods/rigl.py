r"""RigL (Evci et al. 2020, "Rigging the Lottery") and SET (Mocanu et al. 2018) as its random-grow variant.

Every :math:`\Delta T` steps until ``end``, each layer with :math:`n_l` active weights

- drops the :math:`d = \lfloor f(t)\, n_l \rfloor` active weights with the smallest :math:`|w|`,
- grows :math:`d` inactive weights with the largest :math:`|\nabla_w L|` (SET: uniformly at random),

with the cosine drop fraction :math:`f(t) = \tfrac{f_0}{2}(1 + \cos(\pi t / T_{end}))`. Grown
weights start at exactly 0 with zeroed optimizer state; per-layer counts never change. The first
mask is random at the distribution's counts, or with ``init: existing`` the zeros the weights
already have (continuing from a one-shot prune, whose per-layer counts are kept).

Where the dense gradient comes from, at no extra cost: a pruned weight is an ordinary entry of a
dense tensor, so the backward pass already computes its gradient. The pre-step hook (stage 1)
reads ``.grad`` before the manager masks it (stage 2), on update steps only, and keeps just a bool
mask of the chosen grow set until the post-step hook (stage 6) drops by the stepped weights.

Two update rules, chosen by ``reference``:

- ``reference: true`` (the default) is the authors' code (google-research/rigl,
  ``rigl/sparse_optimizers_base.py``, ``SparseRigLOptimizerBase``): updates happen at optimizer
  steps :math:`0, \Delta T, 2\Delta T, \dots` before ``end``, and an update iteration only
  changes the topology: its batch's gradient chooses the growth, the optimizer step is skipped
  and ``step_count`` does not advance (``apply_gradients`` takes the update branch of its
  ``cond``). Each layer keeps its top :math:`n_l - d` active weights by :math:`|w|`, then grows
  the top :math:`d` by :math:`|\nabla_w L|` among all others, just-dropped weights included
  (``_get_update_op``); a just-dropped weight that regrows keeps its value and optimizer state,
  and only new connections start at 0 with zeroed state (``grow_init: zeros``,
  ``initial_acc_scale: 0``). Here the LR schedule still steps per iteration.
- ``reference: false``: every update step is also an optimizer step. The grow set is chosen in
  stage 1 from the weights inactive *before* the update, and the drop in stage 6 from the
  stepped weights, so dropped and grown sets are disjoint.

Under DDP the gradients are all-reduced before stage 1 and the top-k is deterministic, so every
rank computes the same mask.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch

from sparseham import sharding
from sparseham.method import Method
from sparseham.schedules import cosine_drop_fraction, periodic
from sparseham.topk import topk_magnitude_mask, topk_mask

from . import register
from ._common import (
    check_init,
    counts_for,
    existing_masks,
    nm_counts,
    nm_swap,
    pattern_masks,
    random_masks,
    seeded_generator,
)

__all__ = ["RigL", "SET"]


@dataclasses.dataclass
class RigLOptions:
    update_every: int = dataclasses.field(
        default=100, metadata={"help": "steps between mask updates (Delta T)"}
    )
    end: float = dataclasses.field(
        default=0.75, metadata={"help": "stop updating after this fraction of training (T_end / T)"}
    )
    drop_fraction: float = dataclasses.field(default=0.3, metadata={"help": "initial drop fraction f0"})
    reference: bool = dataclasses.field(
        default=True, metadata={"help": "the authors' update: at steps 0, dT, ..., topology-only "
                                        "iterations; just-dropped weights may regrow (see the docstring)"})

    def __post_init__(self):
        if not (isinstance(self.update_every, int) and self.update_every >= 1):
            raise ValueError(f"update_every must be an int >= 1, got {self.update_every}")
        if not 0.0 < self.end <= 1.0:
            raise ValueError(f"end must be in (0, 1], got {self.end}")
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1], got {self.drop_fraction}")


@register("rigl")
class RigL(Method):
    """RigL: prune by magnitude, regrow by dense-gradient magnitude (see the module docstring)."""

    Options = RigLOptions
    distributions = ("uniform", "er", "erk")
    #: ``existing`` starts from the zeros the weights already have (a one-shot prune), not a random mask.
    inits = ("random", "existing")
    supports_pattern = True

    def __init__(self, target: float = 0.0, **kwargs) -> None:
        super().__init__(target, **kwargs)
        check_init(self)

    def setup(self, manager) -> None:
        if manager.total_steps is None:
            raise ValueError(f"{self.name}: needs the length of training: MaskManager(..., total_steps=N)")
        self.end_step = math.floor(self.options.end * manager.total_steps)
        if self.pattern:
            self.counts = nm_counts(manager, *self.pattern)
        else:
            self.counts = counts_for(manager, self.target, self.distribution, self.dense_layers,
                                     self.layer_density)
        self._grow: list[torch.Tensor] | None = None
        self._last_update, self._topology_only = -self.options.update_every, False
        if self.options.update_every >= self.end_step:
            warnings.warn(
                f"{self.name}: no topology update will happen after the start: the next would be at "
                f"step {self.options.update_every}, but updates end at step {self.end_step} "
                f"(end = {self.options.end} of {manager.total_steps} steps); the run is static "
                f"sparse training. Lower sparsity.{self.name}.update_every or train longer",
                stacklevel=2)
        if self.init == "existing":
            masks, self.counts = existing_masks(manager, self.target, self.pattern, self.name)
            manager.set_masks(masks, expected=self.counts)
        elif self.pattern:
            gen = seeded_generator(0)
            scores = [torch.rand(p.shape, generator=gen).to(p.device) for p in manager.params]
            manager.set_masks(pattern_masks(manager, scores, *self.pattern)[0], expected=self.counts)
        else:
            manager.set_masks(random_masks(manager, self.counts), expected=self.counts)

    def _drops(self, manager, step: int) -> list[int]:
        """Weights to drop (and grow) per layer at ``step``; never more than the inactive ones."""
        f = cosine_drop_fraction(step, self.end_step, self.options.drop_fraction)
        return [min(math.floor(f * k), p.numel() - k) for k, p in zip(self.counts, manager.params)]

    def grow_score(self, manager, i: int, step: int) -> torch.Tensor:
        """RigL grows by dense-gradient magnitude (the gradient is still unmasked here).

        Returns a fresh tensor the caller may overwrite; one layer at a time keeps the update's
        temporary memory to the size of the largest layer.
        """
        g = manager.params[i].grad
        return g.abs() if g is not None else torch.zeros_like(manager.params[i])

    def pre_step(self, manager) -> None:
        if self.pattern:
            self._pattern_update(manager)
            return
        if self.options.reference:
            step = manager.step_count  # optimizer steps taken so far (the reference's global_step)
            self._topology_only = self._last_update + self.options.update_every <= step < self.end_step
            if self._topology_only:
                self._last_update = step
                self._reference_update(manager, step)
            return
        step = manager.step_count + 1  # the step being taken
        if not periodic(step, self.options.update_every, self.end_step):
            return
        # Only the grown set per layer (one byte per weight) is held until post_step, and scores
        # exist one layer at a time. topk_mask, not torch.topk: ties (zero gradients of dead
        # units) go to the lower flat index, the same on every device and over FSDP shards.
        self._grow = []
        for i, (m, d) in enumerate(zip(manager.masks, self._drops(manager, step))):
            score = self.grow_score(manager, i, step).masked_fill_(m, -torch.inf)  # inactive only
            self._grow.append(topk_mask(score, d))
            del score

    def takes_optimizer_step(self, manager) -> bool:
        return not self._topology_only

    def state_dict(self):
        return {"last_update": self._last_update}

    def load_state_dict(self, state) -> None:
        self._last_update = state.get("last_update", -self.options.update_every)

    def _pattern_update(self, manager) -> None:
        """N:M: swaps within groups (:func:`nm_swap`), on the schedule of ``reference``: a
        topology-only iteration at steps 0, dT, ...; otherwise before the update step's optimizer
        step, so both rules keep exactly n of every m."""
        o = self.options
        if o.reference:
            step = manager.step_count
            self._topology_only = self._last_update + o.update_every <= step < self.end_step
            due = self._topology_only
        else:
            step = manager.step_count + 1
            due = periodic(step, o.update_every, self.end_step)
        if not due:
            return
        self._last_update = step
        m = self.pattern[1]
        drops = self._drops(manager, step)
        new = [nm_swap(p, mask, self.grow_score(manager, i, step), d, m)
               for i, (p, mask, d) in enumerate(zip(manager.params, manager.masks, drops))]
        manager.zero_state_([a & ~b for a, b in zip(new, manager.masks)])
        manager.set_masks(new, expected=self.counts)

    def _reference_update(self, manager, step: int) -> None:
        new, fresh = [], []
        for i, (p, m, d) in enumerate(zip(manager.params, manager.masks, self._drops(manager, step))):
            keep = topk_magnitude_mask(p.detach(), self.counts[i] - d, among=m)
            score = self.grow_score(manager, i, step).masked_fill_(keep, -torch.inf)  # all but the kept
            mask = keep | topk_mask(score, d)
            del score
            new.append(mask)
            fresh.append(mask & ~m)  # new connections; a regrown just-dropped weight keeps its state
        manager.zero_state_(fresh)
        manager.set_masks(new, expected=self.counts)

    def skip_step(self, manager) -> None:
        self._grow = None

    def post_step(self, manager) -> None:
        if self._grow is None:
            return
        step = manager.step_count
        manager.zero_state_(self._grow)
        new = []
        drops = self._drops(manager, step)
        for i, (p, m, d) in enumerate(zip(manager.params, manager.masks, drops)):
            # The d smallest active |w| leave: the active weights but the largest k - d stay.
            # topk_mask(|w| where active, else -inf), without a float score of the whole layer
            stay = topk_magnitude_mask(p.detach(), int(self.counts[i]) - d, among=m)
            mask = stay | self._grow[i]
            new.append(mask)
            self._grow[i] = None  # release each layer's indices as soon as it is done
        self._grow = None
        manager.set_masks(new, expected=self.counts)


@register("set")
class SET(RigL):
    """SET: RigL's schedule with uniformly random growth instead of gradient-based growth."""

    def grow_score(self, manager, i: int, step: int) -> torch.Tensor:
        # Same numbers on every rank, independent of the global RNG: seeded by (seed, step), then
        # advanced layer by layer.
        if i == 0:
            self._gen = seeded_generator(1_000_003 * step)
        p = manager.params[i]
        return sharding.local_slice(torch.rand(p.shape, generator=self._gen).to(p.device), p)
