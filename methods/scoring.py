"""Pruning-at-initialization scores (magnitude, random, SNIP, GraSP, SynFlow) and dead-unit removal.

Plain functions, no registry: ``methods/static.py`` turns the scores into masks. A higher score
means "keep", except for :func:`grasp`, which returns the paper's score ``S`` whose *highest*
entries are removed (keep the top-k of ``-S``).

Every data or gradient score works on a deep copy of the model in eval mode (see
:func:`scoring_copy`), so the caller's weights, BatchNorm statistics, train/eval mode,
``requires_grad`` flags and ``.grad`` are untouched by construction. Reading batches may draw
from the global RNG (a shuffling ``DataLoader``), so the caller forks it around the scoring.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "chained_pairs", "first_batches", "grasp", "magnitude", "random", "remove_dead_units",
    "scoring_copy", "snip", "synflow",
]

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def scoring_copy(
    model: nn.Module, params: Sequence[Tensor], dtype: torch.dtype | None = None
) -> tuple[nn.Module, list[Tensor]]:
    """A deep copy of ``model`` in eval mode and the copies of ``params`` inside it.

    Only the copied ``params`` require grad (the scores need no other gradient); grads are None.
    A copy costs one model's memory but makes "leave the model exactly as it was" hold for
    weights, buffers, mode, flags and grads alike, with no save/restore to get wrong.
    """
    memo: dict[int, object] = {}
    clone = copy.deepcopy(model, memo)
    weights = [memo[id(p)] for p in params]
    if dtype is not None:
        clone.to(dtype)  # converts in place: the Parameter objects in ``weights`` stay the same
        if any(w.dtype != dtype for w in weights):
            raise RuntimeError("scoring_copy: converting the copy replaced its parameters; "
                               "unset torch.__future__.set_overwrite_module_params_on_conversion")
    clone.eval()
    for p in clone.parameters():
        p.grad = None
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    return clone, weights


def first_batches(data: Iterable[Batch], n: int, device: torch.device) -> list[Batch]:
    """Up to ``n`` ``(x, y)`` batches from ``data`` (fewer if it is shorter), on ``device``."""
    return [(x.to(device), y.to(device)) for x, y in itertools.islice(iter(data), n)]


def _grad(out: Tensor, weights: Sequence[Tensor], **kwargs) -> list[Tensor]:
    grads = torch.autograd.grad(out, weights, allow_unused=True, **kwargs)
    return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, weights)]


def magnitude(params: Sequence[Tensor]) -> list[Tensor]:
    """``|w|`` (Han et al. 2015; as a PaI baseline, Frankle et al. 2021)."""
    return [p.detach().abs() for p in params]


def random(params: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
    """Uniform ``[0, 1)`` scores drawn on the CPU from ``generator``: the same on any device."""
    return [torch.rand(p.shape, generator=generator).to(p.device) for p in params]


def snip(model: nn.Module, params: Sequence[Tensor], batches: Sequence[Batch], loss_fn: LossFn
         ) -> list[Tensor]:
    """SNIP connection sensitivity (Lee et al. 2019, Eq. 6): ``|g ⊙ w|``.

    ``g = sum_b dL_b/dw`` over the batches; ``g ⊙ w`` is the paper's ``dL/dc``, the gradient
    with respect to a multiplicative mask ``c`` at ``c = 1``. The paper's normalisation by the
    sum of all scores is a positive constant and does not change the ranking, so it is omitted.
    """
    clone, weights = scoring_copy(model, params)
    total = [torch.zeros_like(w) for w in weights]
    for x, y in batches:
        total = [t + g for t, g in zip(total, _grad(loss_fn(clone(x), y), weights))]
    return [(t * w).detach().abs() for t, w in zip(total, weights)]


def grasp(model: nn.Module, params: Sequence[Tensor], batches: Sequence[Batch], loss_fn: LossFn,
          temperature: float = 200.0) -> list[Tensor]:
    """GraSP score (Wang et al. 2020, Eq. 8): ``S = -w ⊙ (H g)``.

    Sign convention: removing weight ``w`` changes the gradient norm ``g^T g`` by about ``2 S``
    (Eq. 7 with ``delta = -w``), so removing the *highest* ``S`` preserves gradient flow best
    and the caller keeps the lowest ``S`` (the top-k of ``-S``), as in the authors' code.
    ``g = sum_b dL_b/dw`` with the logits divided by ``temperature`` (no graph);
    then ``H g = sum_b d(g^T dL_b/dw)/dw`` from a second pass with ``create_graph``. As in the
    authors' ``GraSP.py``, both passes divide the logits by the temperature. (They split each
    batch in halves for the first pass; for a mean loss that only scales ``g`` by 2.)
    """
    clone, weights = scoring_copy(model, params)
    g = [torch.zeros_like(w) for w in weights]
    for x, y in batches:
        g = [a + b for a, b in zip(g, _grad(loss_fn(clone(x) / temperature, y), weights))]
    hg = [torch.zeros_like(w) for w in weights]
    for x, y in batches:
        grads = _grad(loss_fn(clone(x) / temperature, y), weights, create_graph=True)
        z = sum((a * b).sum() for a, b in zip(g, grads))
        hg = [a + b for a, b in zip(hg, _grad(z, weights))]
    return [-(w * h).detach() for w, h in zip(weights, hg)]


def synflow(model: nn.Module, params: Sequence[Tensor], input_shape: Sequence[int], *,
            rounds: int = 1, prune: Callable[[list[Tensor], float], list[Tensor]] | None = None
            ) -> list[Tensor]:
    """Iterative SynFlow (Tanaka et al. 2020, Alg. 1): ``|w ⊙ dR/dw|``, data-free.

    ``R = sum(f(1))`` for an all-ones input of shape ``(1, *input_shape)`` through the network
    with every floating parameter *and buffer* replaced by its absolute value (biases and
    BatchNorm included, as the authors' ``linearize`` does to the whole state dict), in eval mode
    so BatchNorm is a fixed affine map. Rounds ``r = 1 .. rounds - 1`` score the masked network
    and call ``prune(scores, r / rounds)`` for the next masks (the caller maps the fraction to
    the density ``d^(r / rounds)``); the scores of the last round are returned, so that pruning
    them at the final density is the last step of the algorithm.

    Numerics: computed in float64 on a copy. At initialization ``R`` is about 5e69 for the CIFAR
    ResNet-56 and 4e72 for ResNet-50 at 224x224, past float32's 3.4e38 (``inf`` and ``nan``
    there); a non-finite or zero ``R`` raises rather than producing such masks. Each round's
    scores are divided by their overall maximum (a positive constant: no ranking changes), so
    the float32 comparison in :func:`sparseham.topk_mask` sees them in range: without biases
    each layer's scores sum to ``R`` (the conservation law, Tanaka et al. Thm. 2), so a layer's
    largest score is at least ``1 / numel`` of the maximum, far from float32 underflow.
    """
    clone, weights = scoring_copy(model, params, torch.float64)
    with torch.no_grad():
        for t in itertools.chain(clone.parameters(), clone.buffers()):
            if t.is_floating_point():
                t.abs_()
    base = [w.detach().clone() for w in weights]
    ones = torch.ones((1, *input_shape), dtype=torch.float64, device=base[0].device)
    masks: list[Tensor] | None = None
    for r in range(1, rounds + 1):
        if masks is not None:
            with torch.no_grad():
                for w, b, m in zip(weights, base, masks):
                    w.copy_(b * m)
        out = clone(ones).sum()
        value = float(out.detach())
        if not 0 < value < math.inf:
            raise ValueError(f"static: SynFlow's R = sum(f(1)) is {value} in float64 at round "
                             f"{r}; the network has no positive path left, or it overflows")
        scores = [(g * w).detach().abs() for g, w in zip(_grad(out, weights), weights)]
        top = torch.stack([s.max() for s in scores]).max()
        scores = [s / top for s in scores]
        if r < rounds and prune is not None:
            masks = prune(scores, r / rounds)
    return scores


# Leaves that act on each unit (channel) separately, so a dead unit stays dead through them.
_PER_UNIT = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardtanh,
    nn.Softplus, nn.Identity, nn.Flatten, nn.modules.batchnorm._BatchNorm,
    nn.modules.dropout._DropoutNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
)
_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def _leaves(module: nn.Module, prefix: str = ""):
    children = list(module.named_children())
    if not children:
        yield module
    elif not isinstance(module, nn.Sequential):
        raise ValueError(f"static: remove_dead needs a plain nn.Sequential model (layers applied "
                         f"in order); '{prefix or 'model'}' is a {type(module).__name__}; set "
                         "remove_dead=False for residual or branching models")
    for name, child in children:
        yield from _leaves(child, f"{prefix}.{name}" if prefix else name)


def chained_pairs(model: nn.Module, params: Sequence[Tensor]) -> list[tuple[int, int]]:
    """Index pairs ``(l, l + 1)`` of ``params`` where layer l's outputs are layer l+1's inputs.

    Only for models built of nested ``nn.Sequential`` (else ``ValueError``): a pair needs both
    layers managed, ungrouped, with only per-unit leaves (activations, BatchNorm, dropout,
    pooling, flatten) between them and ``in(l + 1) == out(l)``; a flatten of a spatial map
    breaks the chain, since then ``in(l + 1) != out(l)``.
    """
    index = {id(p): i for i, p in enumerate(params)}
    pairs, prev = [], None
    for leaf in _leaves(model):
        i = index.get(id(getattr(leaf, "weight", None)))
        if isinstance(leaf, _LAYERS) and i is not None and getattr(leaf, "groups", 1) == 1:
            if prev is not None and params[i].shape[1] == params[prev].shape[0]:
                pairs.append((prev, i))
            prev = i
        elif not isinstance(leaf, _PER_UNIT):
            prev = None
    return pairs


def remove_dead_units(model: nn.Module, params: Sequence[Tensor], masks: Sequence[Tensor]
                      ) -> list[Tensor]:
    """Prune the units that no path crosses any more, until none is left.

    For each chained pair (:func:`chained_pairs`), output unit ``j`` of layer l is dead when its
    incoming row ``mask_l[j]`` or its outgoing column ``mask_{l+1}[:, j]`` is all pruned; both
    are then pruned. A unit with a bias but no input only adds a constant, which the next
    layer's bias can carry. The freed weights are not re-spent: the sparsity ends slightly
    above the target. Reads the device (set-up only).
    """
    masks = [m.clone() for m in masks]
    pairs = chained_pairs(model, params)
    changed = True
    while changed:
        changed = False
        for a, b in pairs:
            alive = masks[a].flatten(1).any(1) & masks[b].transpose(0, 1).flatten(1).any(1)
            row = alive.view(-1, *[1] * (masks[a].dim() - 1))
            col = alive.view(1, -1, *[1] * (masks[b].dim() - 2))
            new_a, new_b = masks[a] & row, masks[b] & col
            changed |= not (torch.equal(new_a, masks[a]) and torch.equal(new_b, masks[b]))
            masks[a], masks[b] = new_a, new_b
    return masks
