"""Helpers shared by the method plug-ins (masks from magnitudes and random scores)."""

from __future__ import annotations

import torch
from torch import Tensor

from sparseham.distributions import fixed_counts, layer_counts
from sparseham.method import suggest
from sparseham.topk import global_topk_masks, nm_groups, nm_kept, nm_mask, topk_mask

__all__ = ["shapes_of", "counts_for", "random_masks", "score_masks", "magnitude_masks", "seeded_generator",
           "nm_counts", "nm_swap", "pattern_masks", "existing_masks", "check_init"]


def nm_counts(manager, n: int, m: int) -> list[int]:
    """Kept weights per layer under an N:M pattern (a layer that does not split into groups of
    ``m`` stays whole)."""
    return [nm_kept(p.shape, n, m) for p in manager.params]


def pattern_masks(manager, scores: list[Tensor], n: int, m: int) -> tuple[list[Tensor], list[int]]:
    """N:M masks keeping the highest ``scores`` of every group, and their per-layer counts."""
    return [nm_mask(s, n, m) for s in scores], nm_counts(manager, n, m)


def shapes_of(manager) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in zip(manager.names, manager.params)}


def counts_for(manager, target: float, distribution: str, dense, fixed=None) -> list[int]:
    """Exact kept count per managed layer for a per-layer distribution (``fixed``: glob ->
    density for layers with a density of their own)."""
    counts = layer_counts(shapes_of(manager), target, distribution, dense, fixed)
    return [counts[n] for n in manager.names]


def seeded_generator(offset: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from ``torch.initial_seed()``: the same on every rank, and it leaves
    the global RNG stream untouched (so resumed runs see the same random numbers)."""
    return torch.Generator(device=device).manual_seed(torch.initial_seed() + offset)


def random_masks(manager, counts: list[int], offset: int = 0) -> list[Tensor]:
    """Uniformly random masks with exactly ``counts[i]`` kept weights in layer ``i``."""
    gen = seeded_generator(offset)
    return [
        topk_mask(torch.rand(p.shape, generator=gen).to(p.device), k) for p, k in zip(manager.params, counts)
    ]


def score_masks(manager, scores: list[Tensor], target: float, distribution: str, dense,
                fixed=None) -> tuple:
    """Keep the highest ``scores``: per layer by ``distribution`` or with one global threshold.

    Returns ``(masks, expected)``: the per-layer counts, or for ``global`` the total kept count
    (its split over layers is only known on the device). Layers matching ``dense`` stay whole;
    layers in ``fixed`` (glob -> density) keep their own count, by their own top-k.
    """
    if distribution != "global":
        counts = counts_for(manager, target, distribution, dense, fixed)
        return [topk_mask(s, k) for s, k in zip(scores, counts)], counts
    given = fixed_counts(shapes_of(manager), fixed, dense)
    budget = round((1.0 - target) * sum(s.numel() for s in scores))
    k = budget - sum(given.values())
    if k < 0:
        raise ValueError(f"the dense layers alone hold more than {1 - target:.4g} of the weights; "
                         "lower the target or keep fewer layers dense")
    free = [s for n, s in zip(manager.names, scores) if n not in given]
    chosen = iter(global_topk_masks(free, k) if free else [])
    masks = [topk_mask(s, given[n]) if n in given else next(chosen) for n, s in zip(manager.names, scores)]
    return masks, budget


def magnitude_masks(manager, weights: list[Tensor], target: float, distribution: str, dense,
                    fixed=None) -> tuple:
    """:func:`score_masks` with ``|w|`` as the score."""
    return score_masks(manager, [w.abs() for w in weights], target, distribution, dense, fixed)


def nm_swap(weight: Tensor, mask: Tensor, score: Tensor, swaps: int, m: int) -> Tensor:
    """RigL under an N:M pattern: in each of the ``swaps`` groups whose best inactive ``score`` is
    highest, the active weight with the smallest ``|weight|`` makes way for that inactive one, so
    every group keeps exactly its ``n``. Returns the new mask (layers without groups: unchanged)."""
    if not nm_groups(mask.shape, m) or swaps <= 0:
        return mask.clone()
    shape = (mask.shape[0], -1, m)
    active = mask.reshape(shape)
    weak = weight.detach().abs().reshape(shape).masked_fill(~active, torch.inf).argmin(-1)
    best, strong = score.reshape(shape).masked_fill(active, -torch.inf).max(-1)
    chosen = torch.topk(best.reshape(-1), min(swaps, best.numel()), sorted=False).indices
    new = active.clone().reshape(-1, m)
    rows = chosen  # one flat index per group
    new[rows, weak.reshape(-1)[chosen]] = False
    new[rows, strong.reshape(-1)[chosen]] = True
    return new.view(mask.shape)


def existing_masks(manager, target: float | None, pattern: tuple[int, int] | None, who: str
                   ) -> tuple[list[Tensor], list[int]]:
    """``init: existing``: masks of the zeros the managed weights already have (a model pruned
    before, e.g. by ``sparseham prune``), and the kept counts. Under an N:M pattern, the ``n``
    largest ``|w|`` of each group (the existing zeros go first). Reads the device: set-up only.

    Raises:
        ValueError: the zeros are more than 1 point of sparsity away from ``target`` (unless None).
    """
    weights = [p.detach() for p in manager.params]
    if pattern:
        return pattern_masks(manager, [w.abs() for w in weights], *pattern)
    masks = [w != 0 for w in weights]
    counts = [int(m.sum()) for m in masks]
    achieved = 1.0 - sum(counts) / sum(w.numel() for w in weights)
    if target is not None and abs(achieved - target) > 0.01:
        raise ValueError(f"{who}: init 'existing': the managed weights are {achieved:.2%} zeros, but the "
                         f"target is {target:.2%}; prune the model first (sparseham prune) or set the "
                         f"target to {achieved:.4g}")
    return masks, counts


def check_init(method) -> None:
    """Refuse an ``init`` the method does not list in its ``inits``."""
    if method.init not in method.inits:
        raise ValueError(f"{method.name}: unknown init {method.init!r}{suggest(method.init, method.inits)}; "
                         f"choose one of {', '.join(method.inits)}")
