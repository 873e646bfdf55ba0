"""One layer at a time: which weights of ``W`` (``(out, in)``) to keep, and SparseGPT's update.

Every function takes the number of weights to **prune** from the layer (``prune``), or an N:M
``pattern = (n, m)`` that keeps ``n`` of every ``m`` consecutive inputs of each output; exactly that
many are removed, whatever the ties.

- Magnitude (Han et al. 2015; the ``prune_magnitude`` of locuslab/wanda): score ``|W_ij|``, compared
  over the whole layer.
- Wanda (Sun et al. 2023, Eq. 1; locuslab/wanda ``lib/prune.py`` ``prune_wanda``): score
  ``S_ij = |W_ij| * ||X_j||_2``, compared per output row (each row loses the same count).
- SparseGPT (Frantar & Alistarh 2023, Alg. 1; IST-DASLab/sparsegpt ``sparsegpt.py``
  ``SparseGPT.fasterprune``): see :func:`sparsegpt`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..topk import nm_mask, topk_mask

__all__ = ["magnitude_keep", "wanda_keep", "row_keep", "sparsegpt", "SparseGPTResult", "block_counts"]


def _check(shape: tuple[int, int], prune: int | None, pattern: tuple[int, int] | None) -> None:
    if (prune is None) == (pattern is None):
        raise ValueError("give either prune (a count) or pattern (n, m), not both or neither")
    if pattern is not None and shape[1] % pattern[1]:
        raise ValueError(f"pattern {pattern[0]}:{pattern[1]} needs an input size that is a multiple of "
                         f"{pattern[1]}, the layer has {shape[1]}")
    if prune is not None and not 0 <= prune <= shape[0] * shape[1]:
        raise ValueError(f"cannot prune {prune} of {shape[0] * shape[1]} weights")


def row_keep(scores: Tensor, prune: int) -> Tensor:
    """Keep mask removing the lowest ``scores`` of each row: ``prune // rows`` per row, one more in
    the first ``prune % rows`` rows (the reference removes ``int(in * sparsity)`` per row; the two
    agree whenever that is the whole count)."""
    rows, cols = scores.shape
    each, extra = divmod(prune, rows)
    drop = each + (extra > 0)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if drop == 0:
        return keep
    lowest = torch.topk(scores.float(), drop, dim=1, largest=False, sorted=True).indices
    count = torch.full((rows, 1), each, device=scores.device)
    count[:extra] += 1
    keep.scatter_(1, lowest, torch.arange(drop, device=scores.device).expand(rows, -1) >= count)
    return keep


def magnitude_keep(weight: Tensor, *, prune: int | None = None, pattern: tuple[int, int] | None = None
                   ) -> Tensor:
    """Keep mask of magnitude pruning: the layer's ``prune`` smallest ``|W|``, or N:M by ``|W|``."""
    _check(weight.shape, prune, pattern)
    scores = weight.detach().abs()
    if pattern is not None:
        return nm_mask(scores, *pattern)
    return topk_mask(scores, weight.numel() - prune)


def wanda_keep(weight: Tensor, norms: Tensor, *, prune: int | None = None,
               pattern: tuple[int, int] | None = None) -> Tensor:
    """Keep mask of Wanda: ``|W_ij| * ||X_j||`` per row (:func:`row_keep`), or N:M by that score."""
    _check(weight.shape, prune, pattern)
    scores = weight.detach().abs().float() * norms.reshape(1, -1)
    if pattern is not None:
        return nm_mask(scores, *pattern)
    return row_keep(scores, prune)


@dataclasses.dataclass
class SparseGPTResult:
    """The reconstructed weight ``W'`` (float32, pruned entries exactly 0), its keep mask, and the
    OBS estimate of the error, ``sum (w - q)^2 / [H^-1]_jj^2 / 2`` (the reference's ``Losses``)."""

    weight: Tensor
    keep: Tensor
    loss: float


def block_counts(prune: int, rows: int, columns: int, blocksize: int) -> list[int]:
    """Pruned count per block of ``blocksize`` columns: proportional to the block's size, rounded by
    largest remainder so they sum to ``prune`` (the reference takes ``int(size * sparsity) + 1`` in
    each block, which misses an exact count)."""
    sizes = [rows * (min(i + blocksize, columns) - i) for i in range(0, columns, blocksize)]
    total = rows * columns
    exact = [prune * s / total for s in sizes]
    counts = [int(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda b: (-(exact[b] - counts[b]), b))
    for b in order[: prune - sum(counts)]:
        counts[b] += 1
    return counts


def _inverse_factor_(h: Tensor, percdamp: float) -> Tensor:
    """The upper Cholesky factor of ``(H + damp I)^-1`` with ``damp = percdamp * mean(diag H)``,
    computed in the memory of ``h`` (one matrix alive at a time, as the reference)."""
    diag = h.diagonal()
    diag.add_(percdamp * diag.mean())
    torch.linalg.cholesky(h, out=h)
    torch.cholesky_inverse(h, out=h)
    return torch.linalg.cholesky(h, upper=True, out=h)


def _block(wt: Tensor, ut: Tensor, keep: Tensor, pattern: tuple[int, int] | None) -> Tensor:
    """Prune one block in place, column by column; returns the errors ``E``.

    Transposed layout (``wt`` and ``keep`` are ``(columns, rows)``, contiguous): the column being
    pruned and the later columns it updates are contiguous rows, which makes the rank-1 update
    ``W[:, j:] -= e U[j, j:]`` (``addr_``) about 1.5x faster than on the column view.
    """
    d = ut.diagonal()
    err = torch.empty_like(wt)
    for i in range(wt.shape[0]):
        if pattern is not None and i % pattern[1] == 0:
            group = slice(i, i + pattern[1])
            scores = wt[group].square() / d[group, None].square()
            keep[group] = False
            keep[group].scatter_(0, torch.topk(scores, pattern[0], dim=0).indices, True)
        e = wt[i].masked_fill(keep[i], 0.0).div_(d[i])
        wt[i:].addr_(ut[i, i:], e, alpha=-1)
        err[i] = e
    return err


@torch.no_grad()
def sparsegpt(weight: Tensor, hessian: Tensor, *, prune: int | None = None,
              pattern: tuple[int, int] | None = None, blocksize: int = 128, percdamp: float = 0.01
              ) -> SparseGPTResult:
    """SparseGPT on one layer: mask selection and OBS weight reconstruction, blocked and lazy.

    ``H = 2 X^T X`` (up to a constant; :meth:`Stats.hessian`). Inputs never seen (``H_jj = 0``) get
    ``H_jj = 1`` and their weights 0, then ``H += 0.01 * mean(diag H) * I`` (dampening) and
    ``U = chol(H^-1)^T`` (upper). Columns are visited in blocks of ``blocksize``; in a block the
    mask keeps the highest ``w^2 / U_jj^2`` (unstructured: over the whole block, chosen when the
    block starts; N:M: over each group of ``m`` columns, chosen when the group starts, from the
    updated weights). Column ``j`` is then pruned and the error ``e = (w_j - q_j) / U_jj`` is spread
    over the later columns of the block, ``W[:, j:] -= e U[j, j:]``; after the block, over the later
    blocks at once, ``W[:, end:] -= E U[block, end:]`` (the lazy batch update).

    As the reference; the only deviation is the unstructured count per block, which is exact here
    (:func:`block_counts`). ``weight`` and ``hessian`` are left as they were.
    """
    rows, columns = weight.shape
    _check((rows, columns), prune, pattern)
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1
    w[:, dead] = 0
    u = _inverse_factor_(h, percdamp)
    keep = torch.ones_like(w, dtype=torch.bool)
    counts = block_counts(prune, rows, columns, blocksize) if pattern is None else None
    loss = torch.zeros((), device=w.device)
    for b, start in enumerate(range(0, columns, blocksize)):
        end = min(start + blocksize, columns)
        wt, ut = w[:, start:end].t().contiguous(), u[start:end, start:end].contiguous()
        keept = torch.ones_like(wt, dtype=torch.bool)
        if counts is not None:
            keept = topk_mask(wt.square() / ut.diagonal()[:, None].square(), wt.numel() - counts[b])
        err = _block(wt, ut, keept, pattern)
        w[:, start:end] = (wt * keept).t()
        keep[:, start:end] = keept.t()
        loss += err.square().sum() / 2
        w[:, end:].addmm_(err.t(), u[start:end, end:], alpha=-1)
    return SparseGPTResult(w, keep, float(loss))
