r"""STR: Soft Threshold weight Reparameterization (Kusupati et al. 2020), as RAIVNLab/STR runs it.

Each managed layer computes its forward weight from a latent :math:`W` and one learnable
threshold parameter :math:`s_l` of shape (1, 1) (``utils/conv_type.py``, ``STRConv``):

.. math::  \hat W = \mathrm{sign}(W) \odot \mathrm{ReLU}(|W| - \sigma(s_l)),

through ``torch.nn.utils.parametrize`` (so it works on any Conv/Linear module, including
torchvision's). The :math:`s_l` sit in their own parameter group. As in the reference
(``main.py``'s ``sparseThreshold`` group with ``st_decay = None``) they get the weights' weight
decay unless ``s_weight_decay`` is set; decay pulls :math:`s_l` towards 0, raising the threshold
:math:`\sigma(s_l)` and with it the sparsity. ``s_init = -3200`` (``configs/largescale/
resnet50-str.yaml``) prunes nothing at first: the sparsity emerges as the decay brings
:math:`s_l` up; ``s_init = -5`` (this project's earlier default) prunes about 18% of a fresh
ResNet-50 at step 0. The implicit mask is :math:`|W| > \sigma(s_l)`; the tracker splits by it.

HAM acts on the latent :math:`W` and, with ``ham_threshold: true`` (the default), on
:math:`s_l` too: the authors' HAM wrapper mirrors every tensor with ``ndim >= 2``, and STR's
:math:`s_l` has shape (1, 1), so that is what the HAM paper's STR + HAM ran. With
``ham_threshold: false`` the thresholds' group has HAM's alpha and beta at 0.

``mode: free`` is the paper's STR: it ends wherever the thresholds take it. ``mode: target``
(the default) steers STR's own mechanism to ``sparsity.target`` in two phases.

1. *Ramp* (steps ``[0, project_at)``): every ``control_every`` steps (one device read) the
   achieved sparsity is compared with a cubic ramp to the target at ``project_at``, and the
   thresholds' weight decay is scaled by :math:`\exp(\text{gain}\cdot(s^*(t) - s(t)) / s_f)`;
   decay drives the thresholds, the loss gradient pushes back, and STR chooses the per-layer
   allocation.
2. *Window* (``[project_at, project_by]``): the thresholds stop training (their decay and the
   loss would undo a correction within a few steps), and at each control step that is not yet
   within 1% of the kept weights of the target, every :math:`s_l` is shifted by one common
   offset :math:`\delta` that puts the implicit masks exactly at the target (aimed past it by
   the drift seen since the last shift). A weight is kept while
   :math:`\mathrm{logit}|W| > s_l + \delta`, so :math:`\delta` is the K-th largest
   :math:`\mathrm{logit}|W| - s_l` over all layers (one global top-k); for small thresholds it
   scales every layer's threshold by the same factor :math:`e^\delta`, so the thresholds, not
   a magnitude ranking, still decide the allocation. The weights then train on.

At the first control step after a shift where the sparsity is within 1% of the kept weights of
the target (or at ``project_by`` regardless), a projection onto the exact target corrects what
is left, and the rest of training fine-tunes that mask. The projection keeps STR's allocation:
each layer keeps its share of the exact budget in proportion to the weights STR kept there
(layers in ``dense_layers``/``layer_density`` keep their own counts), by the largest latent
:math:`|W|`, which within a layer is STR's own mask :math:`|W| > \sigma(s_l)`; so it moves only what
the remaining sparsity error demands. Measured on Fashion-MNIST (``configs/studies/str_projection.yaml``):
with the ramp alone the projection moved 1.9-17% of the kept weights, with the window's shift
0.2-0.5% on LeNet-300 (docs/evidence/str-projection.md). How many kept weights the projection
moved, the shifts, and the per-layer densities before and after it are recorded (``projection``).
Either way the saved weights are the effective sparse weights and the mask matches them.

Deviation from the reference: target mode has no counterpart in RAIVNLab/STR, which reaches a
sparsity only through ``s_init`` and the decay; ``mode: free`` is the reference.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparseham.distributions import apportion, fixed_counts
from sparseham.method import Method
from sparseham.schedules import cubic_sparsity
from sparseham.topk import topk_mask

from . import register
from ._common import shapes_of

__all__ = ["STR", "SoftThreshold"]


class SoftThreshold(nn.Module):
    """``sign(w) * relu(|w| - sigmoid(s))`` with a learnable ``s`` of shape (1, 1)."""

    def __init__(self, s_init: float) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.full((1, 1), float(s_init)))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.sign(w) * torch.relu(w.abs() - torch.sigmoid(self.s))


@dataclasses.dataclass
class STROptions:
    s_init: float | None = dataclasses.field(
        default=None, metadata={"help": "initial threshold parameter s (sigmoid(s) is the threshold); "
                                        "null = -3200 (the reference) in free mode, -5 in target mode"}
    )
    s_weight_decay: float | None = dataclasses.field(
        default=None, metadata={"help": "weight decay of the thresholds; null = the weights' (the reference)"}
    )
    ham_threshold: bool = dataclasses.field(
        default=True, metadata={"help": "HAM's mirror step on the thresholds too (the authors' wrapper)"}
    )
    mode: str = dataclasses.field(
        default="target",
        metadata={"help": "target: steer to sparsity.target, then project (project_at, project_by); "
                          "free: plain STR"},
    )
    project_at: float = dataclasses.field(
        default=0.8,
        metadata={"help": "target mode: the ramp reaches the target here, and from here the projection "
                          "waits until the sparsity is within 1% of the kept weights of it"},
    )
    project_by: float = dataclasses.field(
        default=0.9,
        metadata={"help": "target mode: fraction of training by which it projects and freezes the mask, "
                          "close or not"},
    )
    control_every: int = dataclasses.field(
        default=20, metadata={"help": "target mode: steps between sparsity reads and decay adjustments"}
    )
    gain: float = dataclasses.field(
        default=4.0, metadata={"help": "target mode: log-scale of the decay change per unit relative error"}
    )

    def __post_init__(self):
        if self.mode not in ("target", "free"):
            raise ValueError(f"mode must be target or free, got {self.mode!r}")
        if not 0.0 < self.project_at <= self.project_by <= 1.0:
            raise ValueError(f"need 0 < project_at <= project_by <= 1, got {self.project_at} and "
                             f"{self.project_by}")
        if self.s_weight_decay is not None and self.s_weight_decay < 0:
            raise ValueError(f"s_weight_decay must be >= 0, got {self.s_weight_decay}")
        if not (isinstance(self.control_every, int) and self.control_every >= 1) or self.gain < 0:
            raise ValueError(f"need control_every >= 1 and gain >= 0, got {self.control_every}, {self.gain}")


def allocate(total: int, weights: list[int], caps: list[int]) -> list[int]:
    """``total`` split over layers in proportion to ``weights`` (by capacity where all are 0),
    each at most its cap, summing exactly to ``min(total, sum(caps))``: layers whose share
    exceeds their cap are filled first, the rest is shared by largest remainders."""
    counts, open_ = [0] * len(caps), [i for i, c in enumerate(caps) if c > 0]
    left = min(total, sum(caps))
    while left > 0 and open_:
        by = weights if any(weights[i] for i in open_) else caps
        basis = {i: by[i] for i in open_}
        scale = left / sum(basis.values())
        full = [i for i in open_ if basis[i] * scale >= caps[i]]
        if full:  # fill them, and share what is left among the others
            for i in full:
                counts[i] = caps[i]
            left -= sum(caps[i] for i in full)
            open_ = [i for i in open_ if i not in full]
            continue
        shares = apportion({i: basis[i] * scale for i in open_}, left, {i: caps[i] for i in open_})
        for i, k in shares.items():
            counts[i] = k
        break
    return counts


def _owner(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


@register("str")
class STR(Method):
    """Soft threshold reparameterization (see the module docstring)."""

    Options = STROptions
    distributions = ("uniform", "er", "erk")
    masking = False

    @property
    def s_init(self) -> float:
        if self.options.s_init is not None:
            return self.options.s_init
        return -3200.0 if self.options.mode == "free" else -5.0

    def setup(self, manager) -> None:
        o = self.options
        if o.mode == "target" and manager.total_steps is None:
            raise ValueError("str: target mode needs the length of training: MaskManager(..., total_steps=N)")
        self.modules = []
        for name in manager.names:
            if not name.endswith("weight"):
                raise ValueError(f"str: can only reparameterize module weights, got {name!r}")
            module = _owner(manager.model, name)
            parametrize.register_parametrization(module, "weight", SoftThreshold(self.s_init))
            self.modules.append(module)
        opt = manager.optimizer
        decay = o.s_weight_decay if o.s_weight_decay is not None else opt.defaults.get("weight_decay", 0.0)
        group = {"params": [m.parametrizations.weight[0].s for m in self.modules], "weight_decay": decay}
        if not o.ham_threshold and hasattr(opt, "group_keys"):  # a HAM: no mirror step on s
            group.update(dict.fromkeys(opt.group_keys, 0.0))
        opt.add_param_group(group)
        self.group = opt.param_groups[-1]
        self.base_decay = max(float(decay), 1e-8)
        self.projected, self.projection = False, None
        self.shifted_at, self.shifts, self.frozen = -1, 0, False
        # The ramp starts where s_init left the sparsity (about 20% at -5), not at 0: from 0 the
        # controller first cut the decay to nothing, then needed most of training to rebuild it,
        # and overshot the target with the thresholds' momentum (91.9% for 90% on LeNet-300).
        self.start_sparsity = manager.sparsity() if o.mode == "target" else 0.0
        self.project_step = round(o.project_at * manager.total_steps) if o.mode == "target" else None
        self.deadline = round(o.project_by * manager.total_steps) if o.mode == "target" else None

    def _implicit_masks(self) -> list[torch.Tensor]:
        return [
            m.parametrizations.weight.original.detach().abs()
            > torch.sigmoid(m.parametrizations.weight[0].s.detach())
            for m in self.modules
        ]

    def tracking_masks(self, manager):
        return manager.masks if self.projected else self._implicit_masks()

    def tracking_masks_fixed(self, manager):
        return self.projected  # the implicit masks |W| > tau follow the step's weights

    def effective_weights(self, manager):
        return manager.params if self.projected else [m.weight.detach() for m in self.modules]

    def post_step(self, manager) -> None:
        step = manager.step_count
        if self.projected or self.project_step is None:
            return
        every = self.options.control_every
        waiting = step >= self.project_step
        if step != self.deadline and (step - self.project_step if waiting else step) % every:
            return
        achieved = manager.sparsity()  # the one device read of a control step
        # Within 1% of the kept weights of the target, the projection moves at most that many.
        close = abs(achieved - self.target) <= 0.01 * (1.0 - self.target)
        if not waiting:
            self._steer(step, achieved)
        elif step >= self.deadline or (close and step > self.shifted_at):
            self._project(manager)
        else:
            self._freeze()
            # Aim past the target by the drift seen since the last shift (the weights still move),
            # so that the sparsity is on target at the next check.
            drift = achieved - self.target if self.shifts else 0.0
            self._shift(manager, step, self.target - drift)

    def _freeze(self) -> None:
        """Stop the thresholds' training: their decay and the loss would undo a shift within a
        few steps (it came back to 95.6% from 95.0% in 20 steps on LeNet-300)."""
        for m in self.modules:
            m.parametrizations.weight[0].s.requires_grad_(False).grad = None
        self.frozen = True

    def _steer(self, step: int, achieved: float) -> None:
        """Scale the thresholds' weight decay towards the ramp."""
        ahead = min(step + self.options.control_every, self.project_step)
        start = min(self.start_sparsity, self.target)
        want = cubic_sparsity(ahead, 0, self.project_step, start, self.target)
        error = (want - achieved) / max(self.target, 1e-3)
        # Rate-limited: the thresholds carry momentum, so a large correction overshoots; and at
        # least 1/100 of the configured decay, so it never has to climb back from nothing.
        factor = min(max(math.exp(self.options.gain * error), 0.5), 1.5)
        decay = self.group["weight_decay"] * factor
        self.group["weight_decay"] = min(max(decay, self.base_decay / 100), 1.0)

    def _shift(self, manager, step: int, aim: float) -> None:
        """Move every threshold by one common offset in s so that the implicit masks are at
        sparsity ``aim``; training then goes on with these thresholds.

        A weight is kept while logit|W| > s_l + delta, so the offset that keeps exactly K weights
        over all layers is the K-th largest logit|W| - s_l (one global top-k). For small
        thresholds sigma(s + delta) ~ e^delta sigma(s): every layer's threshold is scaled by the
        same factor, so STR's thresholds, not a magnitude ranking, still decide the allocation.
        """
        with torch.no_grad():
            ss = [m.parametrizations.weight[0].s for m in self.modules]
            u = torch.cat([(torch.logit(m.parametrizations.weight.original.abs().clamp(max=1 - 1e-6))
                            - s).flatten() for m, s in zip(self.modules, ss)])
            n = u.numel()
            keep = round((1.0 - min(max(aim, 0.0), 1.0)) * n)
            if 0 < keep < n:  # halfway between the K-th and the (K+1)-th largest
                delta = 0.5 * (u.kthvalue(n - keep + 1).values + u.kthvalue(n - keep).values)
                if torch.isfinite(delta):
                    for s in ss:
                        s.add_(delta)
        self.shifted_at = step
        self.shifts += 1

    def _project(self, manager) -> None:
        before = self._implicit_masks()
        # Ranked by the latent |W|: its top k_l in a layer is STR's own mask |W| > sigma(s_l), and
        # a layer that gains weights gets those just below its threshold.
        latent = [m.parametrizations.weight.original.detach().abs() for m in self.modules]
        self._bake(manager)
        shapes = shapes_of(manager)
        given = fixed_counts(shapes, self.layer_density, self.dense_layers)
        numels = [p.numel() for p in manager.params]
        goal = round((1.0 - self.target) * sum(numels)) - sum(given.values())
        if goal < 0:
            raise ValueError(f"str: the dense layers alone hold more than {1 - self.target:.4g} of the "
                             "weights; lower the target or keep fewer layers dense")
        free = [n not in given for n in manager.names]
        shares = allocate(goal, [int(m.sum()) if f else 0 for m, f in zip(before, free)],
                          [k if f else 0 for k, f in zip(numels, free)])
        expected = [given.get(n, k) for n, k in zip(manager.names, shares)]
        masks = [topk_mask(score, k) for score, k in zip(latent, expected)]
        # Moved: weights the projection pruned or revived, as a fraction of the weights it keeps.
        moved = sum(int(torch.count_nonzero(a ^ b)) for a, b in zip(before, masks))
        kept = sum(int(m.sum()) for m in masks)
        numel = {n: p.numel() for n, p in zip(manager.names, manager.params)}
        self.projection = {
            "step": manager.step_count, "moved": moved, "moved_fraction": moved / max(kept, 1),
            "threshold_shifts": self.shifts,
            "sparsity_before": 1 - sum(int(m.sum()) for m in before) / sum(numel.values()),
            "densities_before": {n: int(m.sum()) / numel[n] for n, m in zip(manager.names, before)},
            "densities_after": {n: int(m.sum()) / numel[n] for n, m in zip(manager.names, masks)},
        }
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

    def summary(self):
        return {"projection": self.projection, "threshold_decay": self.group["weight_decay"]}

    def state_dict(self):
        return {"projected": self.projected, "projection": self.projection,
                "decay": self.group["weight_decay"], "start_sparsity": self.start_sparsity,
                "shifted_at": self.shifted_at, "shifts": self.shifts, "frozen": self.frozen}

    def load_state_dict(self, state) -> None:
        self.projection = state.get("projection")
        if "decay" in state:
            self.group["weight_decay"] = state["decay"]
        self.start_sparsity = state.get("start_sparsity", self.start_sparsity)
        self.shifted_at, self.shifts = state.get("shifted_at", -1), state.get("shifts", 0)
        if state.get("frozen") and not state["projected"]:
            self._freeze()
        if state["projected"] and not self.projected:
            self._bake(None)
            self.masking = True
