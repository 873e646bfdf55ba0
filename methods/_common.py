"""Helpers shared by the method plug-ins (masks from magnitudes and random scores)."""

from __future__ import annotations

import torch
from torch import Tensor

from sparseham.distributions import layer_counts, matches_any
from sparseham.topk import global_topk_masks, topk_mask

__all__ = ["shapes_of", "counts_for", "random_masks", "magnitude_masks", "seeded_generator"]


def shapes_of(manager) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in zip(manager.names, manager.params)}


def counts_for(manager, target: float, distribution: str, dense) -> list[int]:
    """Exact kept count per managed layer for a per-layer distribution."""
    counts = layer_counts(shapes_of(manager), target, distribution, dense)
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


def magnitude_masks(manager, weights: list[Tensor], target: float, distribution: str, dense) -> tuple:
    """Keep the largest ``|w|``: per layer by ``distribution`` or with one global threshold.

    Returns ``(masks, expected)``: the per-layer counts, or for ``global`` the total kept count
    (its split over layers is only known on the device). Layers matching ``dense`` stay whole.
    """
    if distribution != "global":
        counts = counts_for(manager, target, distribution, dense)
        return [topk_mask(w.abs(), k) for w, k in zip(weights, counts)], counts
    total = sum(w.numel() for w in weights)
    is_dense = [matches_any(n, dense) for n in manager.names]
    budget = round((1.0 - target) * total) - sum(w.numel() for w, d in zip(weights, is_dense) if d)
    free = [w.abs() for w, d in zip(weights, is_dense) if not d]
    chosen = iter(global_topk_masks(free, budget))
    masks = [torch.ones_like(w, dtype=torch.bool) if d else next(chosen) for w, d in zip(weights, is_dense)]
    return masks, round((1.0 - target) * total)
