"""How many weights each layer keeps in a one-shot prune: per-layer distributions, one global
threshold, or OWL's outlier-weighted layerwise sparsity.

- ``uniform`` / ``er`` / ``erk``: :func:`sparseham.layer_counts` (uniform is what the references do),
  over the stored weight shapes as every other method.
- ``global``: one threshold over the scores of every layer decides how many each layer keeps;
  the method then chooses which, in its own comparison group (a row for Wanda, a block of columns
  for SparseGPT). The score is ``|W|`` for magnitude, and ``|W_ij| * ||X_j||`` for Wanda and
  SparseGPT (the diagonal approximation of SparseGPT's saliency ``w^2 / [H^-1]_jj^2``, Sun et al.
  2023, Sec. 3), taken from a calibration pass over the unpruned model.
- OWL (Yin et al. 2024, Sec. 4; luuyin/OWL ``lib/prune_all.py`` ``prune_wanda_outlier``): the
  outlier ratio ``D_g`` of a group (a transformer block, or a layer outside the blocks) is the
  fraction of its Wanda scores above ``M`` times their mean; the group keeps the density
  ``(1 - S) + R_g - mean(R)`` with ``R_g = 2 * lambda * (D_g - min D) / (max D - min D)``, so
  more outliers mean fewer pruned weights. The defaults ``M = 5``, ``lambda = 0.08`` are the OWL
  README's LLaMA settings (its argparse default for ``M`` is 3). Deviation: the mean is weighted
  by the groups' sizes, so the global target holds for groups of different sizes (the reference's
  plain mean is the same when all blocks are alike, as in LLaMA).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..distributions import apportion, fixed_counts
from ..topk import global_topk_masks

__all__ = ["OWL", "global_counts", "owl_counts", "outlier_ratio"]


@dataclasses.dataclass(frozen=True)
class OWL:
    """OWL's hyperparameters: the outlier threshold ``m`` (times the mean score) and ``lam``, the
    half-width of the range of layer sparsities around the target."""

    m: float = 5.0
    lam: float = 0.08

    def __post_init__(self) -> None:
        for key, value, low in (("m", self.m, 0.0), ("lam", self.lam, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < math.inf:
                raise ValueError(f"OWL {key} must be a finite number > {low}, got {value!r}")


def _budget(shapes: Mapping[str, Sequence[int]], sparsity: float, dense: Sequence[str],
            fixed: Mapping[str, float] | None) -> tuple[dict[str, int], int]:
    """The counts of the layers with a density of their own, and what is left for the others."""
    given = fixed_counts(shapes, fixed, dense)
    left = round((1.0 - sparsity) * sum(math.prod(s) for s in shapes.values())) - sum(given.values())
    if left < 0:
        raise ValueError(f"the dense layers alone hold more than {1 - sparsity:.4g} of the weights; "
                         "lower the sparsity or keep fewer layers dense")
    return given, left


def global_counts(scores: Mapping[str, Tensor], sparsity: float, dense: Sequence[str] = (),
                  fixed: Mapping[str, float] | None = None) -> dict[str, int]:
    """Kept count per layer under one threshold over all ``scores`` (layers in ``dense`` or
    ``fixed`` keep their own counts and stay out of the competition)."""
    shapes = {n: tuple(s.shape) for n, s in scores.items()}
    given, left = _budget(shapes, sparsity, dense, fixed)
    free = [n for n in scores if n not in given]
    masks = global_topk_masks([scores[n] for n in free], left) if free else []
    counts = {n: int(m.sum()) for n, m in zip(free, masks)}
    return {n: given[n] if n in given else counts[n] for n in scores}


def outlier_ratio(scores: Sequence[Tensor], m: float) -> float:
    """OWL's layerwise outlier distribution: the fraction of ``scores`` above ``m`` times their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > flat.mean() * m).sum()) / flat.numel()


def owl_counts(shapes: Mapping[str, Sequence[int]], groups: Mapping[str, int], ratios: Mapping[int, float],
               sparsity: float, lam: float, dense: Sequence[str] = (),
               fixed: Mapping[str, float] | None = None) -> dict[str, int]:
    """Kept count per layer from OWL's group densities (see the module docstring).

    Args:
        groups: layer name -> group id (its block); ``ratios``: group id -> outlier ratio.
    """
    numel = {n: math.prod(s) for n, s in shapes.items()}
    given, left = _budget(shapes, sparsity, dense, fixed)
    free = [n for n in shapes if n not in given]
    low, high = min(ratios.values()), max(ratios.values())
    spread = {g: 0.0 if high == low else 2 * lam * (r - low) / (high - low) for g, r in ratios.items()}
    size = sum(numel[n] for n in free)
    mean = sum(spread[groups[n]] * numel[n] for n in free) / max(size, 1)
    base = left / max(size, 1)
    exact = {n: min(1.0, max(0.0, base + spread[groups[n]] - mean)) * numel[n] for n in free}
    return {**given, **apportion(exact, left, {n: numel[n] for n in free})}
