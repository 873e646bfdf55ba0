"""One-shot pruning of a trained model with calibration data: :func:`prune`.

The pieces: :mod:`.layers` (a layer as a matrix), :mod:`.calibrate` (statistics, block by block),
:mod:`.solvers` (magnitude, Wanda, SparseGPT on one layer), :mod:`.allocate` (how many each layer
keeps). This module checks the request, decides the counts, and runs the calibrated pass.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..distributions import layer_counts, matches_any
from ..params import is_hf_conv1d, prunable_parameters, unwrap
from . import allocate, solvers
from .calibrate import calibrate
from .layers import LayerView, Stats

__all__ = ["METHODS", "PruneResult", "check_request", "layer_views", "needs_calibration", "prune"]

METHODS = ("magnitude", "wanda", "sparsegpt")
_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


@dataclasses.dataclass
class PruneResult:
    """What :func:`prune` did: per managed tensor (in ``names`` order), the keep mask shaped like the
    stored weight, the kept count, and for SparseGPT the OBS error estimate of the layer."""

    names: list[str]
    masks: list[Tensor]
    kept: list[int]
    losses: dict[str, float]

    @property
    def sparsity(self) -> float:
        """Fraction of the managed weights that were pruned."""
        return 1.0 - sum(self.kept) / sum(m.numel() for m in self.masks)


def layer_views(model: nn.Module, pairs: Sequence[tuple[str, Tensor]]) -> list[LayerView]:
    """A :class:`LayerView` per managed ``(name, weight)``: over the layer whose weight it is, or over
    the bare tensor when no Linear, convolution or Conv1D owns it."""
    owners = {id(m.weight): m for m in model.modules()
              if (isinstance(m, _LAYERS) or is_hf_conv1d(m)) and isinstance(m.weight, Tensor)}
    return [LayerView(n, owners.get(id(p)), p) for n, p in pairs]


def _check(method: str, sparsity: float, pattern: tuple[int, int] | None, distribution: str,
           owl: allocate.OWL | None) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown one-shot method {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if pattern is not None and not (len(pattern) == 2 and 0 < pattern[0] < pattern[1]):
        raise ValueError(f"pattern must be (n, m) with 0 < n < m, got {pattern!r}")
    if distribution not in ("uniform", "er", "erk", "global"):
        raise ValueError(f"unknown distribution {distribution!r}; choose one of uniform, er, erk, global")
    if pattern is not None and owl is not None:
        raise ValueError("OWL allocates unstructured sparsity; it does not combine with an N:M pattern")


def _check_pattern(views: Sequence[LayerView], pattern: tuple[int, int] | None) -> None:
    bad = [f"{v.name} ({v.shape[1]} inputs)" for v in views if pattern and v.shape[1] % pattern[1]]
    if bad:
        more = f", ... ({len(bad) - 2} more)" if len(bad) > 2 else ""
        raise ValueError(f"pattern {pattern[0]}:{pattern[1]} needs an input size that is a multiple of "
                         f"{pattern[1]}: {', '.join(bad[:2])}{more}; exclude these layers")


def _wanda_scores(views: Sequence[LayerView], indices: list[int], stats: dict[int, Stats]
                  ) -> dict[int, Tensor]:
    return {i: views[i].matrix().abs().float() * stats[i].norms().reshape(1, -1) for i in indices}


def _survey(model, views, batches, sequential, owl
            ) -> tuple[dict[int, Tensor], dict[int, int], dict[int, float]]:
    """One calibration pass over the unpruned model: Wanda scores per layer (for ``global``), or OWL's
    outlier ratio per group (a block, or a layer outside the blocks) and each layer's group."""
    scores, groups, ratios = {}, {}, {}

    def visit(indices: list[int], stats: dict[int, Stats], blockwise: bool) -> None:
        found = _wanda_scores(views, indices, stats)
        if owl is None:
            scores.update(found)
            return
        for members in ([indices] if blockwise else [[i] for i in indices]):
            g = len(ratios)
            ratios[g] = allocate.outlier_ratio([found[i] for i in members], owl.m)
            groups.update({i: g for i in members})

    calibrate(model, views, batches, hessian=False, visit=visit, sequential=sequential)
    return scores, groups, ratios


def _counts(model, views, batches, *, method, sparsity, distribution, owl, dense, fixed, sequential
            ) -> list[int]:
    """Kept count per layer (unstructured)."""
    shapes = {v.name: tuple(v.weight.shape) for v in views}
    if owl is None and distribution != "global":
        counts = layer_counts(shapes, sparsity, distribution, dense, fixed)
        return [counts[v.name] for v in views]
    if owl is None and method == "magnitude":
        found = {v.name: v.matrix().abs() for v in views}
        counts = allocate.global_counts(found, sparsity, dense, fixed)
        return [counts[v.name] for v in views]
    scores, groups, ratios = _survey(model, views, batches, sequential, owl)
    if owl is None:
        counts = allocate.global_counts({views[i].name: s for i, s in sorted(scores.items())}, sparsity,
                                        dense, fixed)
    else:
        named = {views[i].name: g for i, g in groups.items()}
        counts = allocate.owl_counts(shapes, named, ratios, sparsity, owl.lam, dense, fixed)
    return [counts[v.name] for v in views]


def needs_calibration(method: str, owl: allocate.OWL | None) -> bool:
    """Whether :func:`prune` runs the model on calibration data: Wanda and SparseGPT always, magnitude
    for OWL's outlier ratios (a global magnitude threshold needs only the weights)."""
    return method != "magnitude" or owl is not None


def check_request(model: nn.Module, *, method: str = "wanda", sparsity: float = 0.5,
                  pattern: tuple[int, int] | None = None, distribution: str = "uniform",
                  owl: allocate.OWL | None = None, params: Sequence[tuple[str, Tensor]] | None = None,
                  include: Iterable[str] | None = None, exclude: Iterable[str] | None = None
                  ) -> list[LayerView]:
    """Check a :func:`prune` request (same arguments) without changing anything; return the views
    of the managed layers. Raises ``ValueError`` as :func:`prune` does, but for missing batches."""
    _check(method, sparsity, pattern, distribution, owl)
    model = unwrap(model)
    pairs = list(params) if params is not None else prunable_parameters(model, include, exclude)
    if not pairs:
        raise ValueError("nothing to prune: no managed parameters (check include/exclude)")
    views = layer_views(model, pairs)
    _check_pattern(views, pattern)
    if needs_calibration(method, owl):
        for v in views:
            v.check_calibratable()
    return views


def prune(model: nn.Module, batches: Iterable[Any] = (), *, method: str = "wanda", sparsity: float = 0.5,
          pattern: tuple[int, int] | None = None, distribution: str = "uniform",
          owl: allocate.OWL | None = None, params: Sequence[tuple[str, Tensor]] | None = None,
          include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
          dense_layers: Sequence[str] = (), layer_density: Mapping[str, float] | None = None,
          blocksize: int = 128, percdamp: float = 0.01, sequential: bool | None = None) -> PruneResult:
    """Prune ``model`` in place, once, with calibration ``batches``; return the masks.

    Args:
        model: a Hugging Face transformer (calibrated block by block) or any module with Linear and
            convolution layers (one pass with hooks); see :mod:`sparseham.oneshot.calibrate`.
        batches: calibration inputs, each a tensor, a dict of keyword inputs or an ``(x, y)`` pair;
            every one is used. Not needed by magnitude pruning with a per-layer distribution.
        method: ``magnitude``, ``wanda`` or ``sparsegpt`` (:mod:`sparseham.oneshot.solvers`).
        sparsity: fraction of the managed weights to prune, in [0, 1) (ignored under ``pattern``).
        pattern: ``(n, m)``: keep ``n`` of every ``m`` consecutive inputs of each output.
        distribution: ``uniform``, ``er``, ``erk`` or ``global`` (:mod:`sparseham.oneshot.allocate`).
        owl: an :class:`~sparseham.oneshot.allocate.OWL` for outlier-weighted layer sparsities.
        params: the managed ``(name, weight)`` pairs; default :func:`sparseham.prunable_parameters`
            of ``include`` and ``exclude``.
        dense_layers, layer_density: globs kept dense, and glob -> density, as for a Method.
        blocksize, percdamp: SparseGPT's column block and dampening (the reference's defaults).
        sequential: ``None`` = block by block when the model is a transformer; ``False`` = one pass.

    Raises:
        ValueError: a bad argument, a layer the method cannot calibrate, an N:M pattern on a layer
            whose input size is not a multiple of ``m``, or no calibration batch where one is needed.
    """
    model = unwrap(model)
    views = check_request(model, method=method, sparsity=sparsity, pattern=pattern, distribution=distribution,
                          owl=owl, params=params, include=include, exclude=exclude)
    batches = list(batches)
    if needs_calibration(method, owl) and not batches:
        raise ValueError(f"method {method!r} needs calibration batches; none were given")
    if pattern is not None:
        kept = [v.weight.numel() * pattern[0] // pattern[1] for v in views]
    else:
        kept = _counts(model, views, batches, method=method, sparsity=sparsity, distribution=distribution,
                       owl=owl, dense=dense_layers, fixed=layer_density, sequential=sequential)
    _warn_collapse(views, kept, distribution, layer_density)
    masks = [torch.ones_like(v.weight, dtype=torch.bool) for v in views]
    result = PruneResult([v.name for v in views], masks, kept, {})
    active = [i for i, v in enumerate(views) if pattern is not None or kept[i] < v.weight.numel()]

    def visit(indices: list[int], stats: dict[int, Stats] | None, blockwise: bool = True) -> None:
        for i in indices:
            _prune_layer(views[i], i, None if stats is None else stats[i], result, method, pattern,
                         blocksize, percdamp)

    if method != "magnitude":
        calibrate(model, [views[i] for i in active], batches, hessian=method == "sparsegpt",
                  visit=_reindexed(visit, active), sequential=sequential)
    else:
        visit(active, None)
    return result


def _warn_collapse(views: Sequence[LayerView], kept: list[int], distribution: str,
                   layer_density: Mapping[str, float] | None) -> None:
    """A global threshold can empty a layer whose scores run low (layer collapse; Tanaka et al.
    2020): say so, unless a density of its own asked for it."""
    asked = tuple(layer_density or ())
    empty = [v.name for v, k in zip(views, kept) if k == 0 and not matches_any(v.name, asked)]
    if distribution == "global" and empty:
        more = f", ... ({len(empty) - 3} more)" if len(empty) > 3 else ""
        warnings.warn(f"distribution 'global' prunes {', '.join(empty[:3])}{more} entirely (layer collapse): "
                      "the model may no longer pass signals through it; use distribution uniform or OWL, "
                      "or keep the layer dense (dense_layers)", stacklevel=3)


def _reindexed(visit, active: list[int]):
    """``visit`` for a calibration over the sublist ``active`` of the views."""
    def inner(indices: list[int], stats: dict[int, Stats], blockwise: bool) -> None:
        visit([active[i] for i in indices], {active[i]: s for i, s in stats.items()}, blockwise)
    return inner


def _prune_layer(view: LayerView, i: int, stats: Stats | None, result: PruneResult, method: str,
                 pattern: tuple[int, int] | None, blocksize: int, percdamp: float) -> None:
    w = view.matrix()
    how = {"pattern": pattern} if pattern is not None else {"prune": w.numel() - result.kept[i]}
    if method == "sparsegpt":
        solved = solvers.sparsegpt(w, stats.hessian(), **how, blocksize=blocksize, percdamp=percdamp)
        keep, new = solved.keep, solved.weight
        result.losses[view.name] = solved.loss
    else:
        keep = (solvers.magnitude_keep(w, **how) if method == "magnitude"
                else solvers.wanda_keep(w, stats.norms(), **how))
        new = w * keep
    view.write_(new)
    result.masks[i] = view.stored(keep).contiguous()
    if pattern is None and int(keep.sum()) != result.kept[i]:
        raise RuntimeError(f"{view.name}: kept {int(keep.sum())} weights, not {result.kept[i]}")
