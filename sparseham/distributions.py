"""How much of each layer is kept: uniform, ER and ERK densities (RigL, Evci et al. 2020).

For a target sparsity ``s`` over layers with ``n_l`` weights, each layer keeps ``k_l`` weights with
``sum_l k_l = round((1 - s) * sum_l n_l)``. The densities are ``d_l = eps * r_l`` with one scale
``eps`` solved for the budget, where

- uniform: ``r_l = 1``;
- ER (Erdos-Renyi, Mocanu et al. 2018): ``r_l = (n_in + n_out) / (n_in * n_out)``, the two fan dims;
- ERK (ER-Kernel): ``r_l = sum(shape) / prod(shape)``, all dims including the kernel.

A layer whose density would exceed 1 is made dense and ``eps`` is re-solved over the others,
until none exceeds 1. Layers given a density of their own (``fixed``, as jaxpruner's
``custom_sparsity_map`` and torch.ao's per-layer config) keep exactly ``round(d * n)`` weights and
the rest of the budget is solved over the other layers. The real-valued budget is then turned
into integers by largest remainder, so the global count is exact and ``round(d_l * n_l) == k_l``
for the returned densities.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["apportion", "layer_densities", "layer_counts", "matches_any", "fixed_counts"]

_DISTRIBUTIONS = ("uniform", "er", "erk")


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """True when ``name`` matches one of the glob ``patterns``."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _raw_score(shape: Sequence[int], distribution: str) -> float:
    if distribution == "uniform":
        return 1.0
    if distribution == "er":
        n_out, n_in = shape[0], (shape[1] if len(shape) > 1 else 1)
        return (n_in + n_out) / (n_in * n_out)
    return sum(shape) / math.prod(shape)


def fixed_counts(
    shapes: Mapping[str, Sequence[int]], fixed: Mapping[str, float] | None, dense: Iterable[str] = ()
) -> dict[str, int]:
    """Kept counts of the layers whose density is given: ``fixed`` (glob -> density; the first
    matching glob wins) and ``dense`` (globs, density 1).

    Raises:
        ValueError: a density outside [0, 1], or a glob that matches no layer.
    """
    out: dict[str, int] = {}
    for pattern, density in (fixed or {}).items():
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 <= density <= 1.0:
            raise ValueError(f"layer density {pattern!r}: {density!r}: a density must be a number in [0, 1]")
        hits = [n for n in shapes if matches_any(n, [pattern])]
        if not hits:
            raise ValueError(f"layer density {pattern!r} matches no managed layer "
                             f"(they are: {', '.join(shapes)})")
        for n in hits:
            out.setdefault(n, round(density * math.prod(shapes[n])))
    for n in shapes:
        if n not in out and matches_any(n, dense):
            out[n] = math.prod(shapes[n])
    return out


def layer_counts(
    shapes: Mapping[str, Sequence[int]],
    sparsity: float,
    distribution: str = "erk",
    dense: Iterable[str] = (),
    fixed: Mapping[str, float] | None = None,
) -> dict[str, int]:
    """Number of weights kept per layer; see :func:`layer_densities`."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if distribution == "global":
        raise ValueError(
            "distribution 'global' has no per-layer densities: one threshold over all scores is "
            "chosen at mask time (use global_topk_masks)"
        )
    if distribution not in _DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of uniform, er, erk, global")
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    budget = round((1.0 - sparsity) * sum(numel.values()))
    given = fixed_counts(shapes, fixed, dense)
    is_dense = {name: False for name in shapes}
    raw = {name: _raw_score(shape, distribution) for name, shape in shapes.items()}
    while True:
        free = [n for n in shapes if not is_dense[n] and n not in given]
        left = budget - sum(given.values()) - sum(numel[n] for n in shapes if is_dense[n])
        if left < 0:
            what = "the dense layers" + (" and those with a density of their own" if fixed else "")
            raise ValueError(f"{what} alone hold more than {1 - sparsity:.4g} of the weights; "
                             "lower the sparsity or keep fewer layers dense")
        denom = sum(raw[n] * numel[n] for n in free)
        eps = left / denom if denom > 0 else 0.0
        over = [n for n in free if eps * raw[n] > 1.0]
        if not over:
            break
        for n in over:
            is_dense[n] = True
    exact = {n: (numel[n] if is_dense[n] else eps * raw[n] * numel[n]) for n in free + [
        n for n in shapes if is_dense[n]]}
    counts = {**apportion(exact, budget - sum(given.values()), numel), **given}
    if not free and sum(counts.values()) != budget:
        raise ValueError(f"every layer has a density of its own: they keep {sum(counts.values())} "
                         f"weights, the sparsity {sparsity:.4g} asks for {budget}; leave one layer free")
    return {n: counts[n] for n in shapes}


def apportion(exact: Mapping[str, float], budget: int, numel: Mapping[str, int]) -> dict[str, int]:
    """Largest-remainder rounding of ``exact`` to integers that sum to ``budget``."""
    counts = {n: min(numel[n], math.floor(v)) for n, v in exact.items()}
    short = budget - sum(counts.values())
    # Ties broken by name so every process rounds the same way.
    order = sorted(exact, key=lambda n: (-(exact[n] - counts[n]), n))
    for n in order:
        if short <= 0:
            break
        if counts[n] < numel[n]:
            counts[n] += 1
            short -= 1
    return counts


def layer_densities(
    shapes: Mapping[str, Sequence[int]],
    sparsity: float,
    distribution: str = "erk",
    dense: Iterable[str] = (),
    fixed: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Per-layer densities (fraction kept) that meet the global ``sparsity`` exactly.

    Args:
        shapes: layer name -> weight shape (``(out, in)`` or ``(out, in, *kernel)``).
        sparsity: global fraction of zeros over all given layers, in [0, 1).
        distribution: ``"uniform"``, ``"er"`` or ``"erk"``, as in RigL.
        dense: glob patterns of layer names kept dense; the others absorb the budget.
        fixed: glob -> density for layers with a density of their own (exactly ``round(d * n)``
            weights kept); the others absorb the rest of the budget.

    Returns:
        layer name -> density ``k_l / n_l``; ``sum_l k_l == round((1 - sparsity) * N)``.

    Example:
        >>> layer_densities({"fc1": (300, 784), "fc2": (100, 300), "fc3": (10, 100)}, 0.9)
    """
    counts = layer_counts(shapes, sparsity, distribution, dense, fixed)
    return {n: counts[n] / math.prod(shapes[n]) for n in shapes}
