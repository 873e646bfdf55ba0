"""Gather calibration statistics of the managed layers with forward hooks, block by block.

**Sequential path** (Hugging Face transformers; the references' ``prune_wanda``/``prune_sparsegpt``
in locuslab/wanda ``lib/prune.py`` and ``llama_sequential`` in IST-DASLab/sparsegpt ``llama.py``):
the model runs on every calibration batch until its first block, whose inputs (hidden states and
keyword arguments: attention mask, positions, rotary embeddings) are kept. Then, for each block in
turn: hooks on its managed layers gather statistics while the block runs on the kept inputs;
``visit`` prunes the block's layers; the block runs again, now pruned, and its outputs replace
the kept inputs as the next block's. So each block sees the inputs the already pruned blocks
before it produce, and memory holds one block boundary's activations for all batches (the
references hold two). Every layer of a block is calibrated on the dense block's activations, as
both references do by default (SparseGPT's ``--true-sequential`` is not offered). The keyword
arguments of the first block are reused for every block, as in the references.

**Layers outside the blocks** (every layer of a model without blocks, such as a vision model;
BERT's pooler) take the **simple path**: one forward pass of the whole model over every
calibration batch with hooks on those layers, before any block is pruned; they are pruned first.
What differs from the sequential path: all their inputs come from the model as it was before
this pruning, not from the pruned layers before them.

Nothing here leaves a trace: hooks are removed, the train/eval mode and ``config.use_cache`` are
restored (calibration runs in eval mode, no gradients).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .layers import LayerView, Stats

__all__ = ["find_blocks", "call_model", "calibrate"]

Visit = Callable[[list[int], dict[int, Stats], bool], None]


class _Reached(Exception):
    """Raised by the hook on the first block: the rest of the model is not needed."""


def find_blocks(model: nn.Module, views: Sequence[LayerView]) -> list[nn.Module] | None:
    """The repeated blocks of a Hugging Face transformer (``model.layers``, ``transformer.h``,
    ``encoder.layer``...): the ``nn.ModuleList`` of one class, inside a module with a ``config``
    that has a ``model_type``, holding the most managed layers. ``None`` for other models."""
    if not any(hasattr(getattr(m, "config", None), "model_type") for m in model.modules()):
        return None
    owned = {id(v.module) for v in views}
    best, most = None, 0
    for m in model.modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0 or len({type(b) for b in m}) != 1:
            continue
        count = sum(id(sub) in owned for sub in m.modules())
        if count > most:
            best, most = list(m), count
    if best is not None and len({getattr(b, "attention_type", None) for b in best}) > 1:
        raise ValueError(f"the blocks of {type(model).__name__} mix attention types (sliding and full); "
                         "calibrating them in sequence is not supported: pass sequential=False")
    return best


def call_model(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on a calibration batch: a tensor, a dict of keyword inputs, or a tuple or list
    whose first element is the input (``(x, y)`` as training data; the labels are ignored)."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


@contextlib.contextmanager
def _calibrating(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    configs = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "use_cache")]
    caches = [c.use_cache for c in configs]
    model.eval()
    for c in configs:
        c.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        for c, cache in zip(configs, caches):
            c.use_cache = cache


@contextlib.contextmanager
def _hooks(views: dict[int, LayerView], stats: dict[int, Stats]) -> Iterator[None]:
    def hook(i: int):
        def gather(module, args, kwargs, output) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            stats[i].add(views[i].rows(x))
        return gather

    handles = [views[i].module.register_forward_hook(hook(i), with_kwargs=True) for i in views]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _gather(views: dict[int, LayerView], hessian: bool, run: Callable[[], None]) -> dict[int, Stats]:
    stats = {i: Stats(v.shape[1], v.weight.device, hessian) for i, v in views.items()}
    with _hooks(views, stats):
        run()
    unseen = [views[i].name for i, s in stats.items() if s.count == 0]
    if unseen:
        raise ValueError(f"{', '.join(unseen)} saw no calibration input (the forward pass does not use "
                         "them); exclude them")
    return stats


def _hidden(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _block_inputs(model: nn.Module, first: nn.Module, batches: Sequence[Any]) -> list[tuple[tuple, dict]]:
    inputs: list[tuple[tuple, dict]] = []

    def catch(module, args, kwargs):
        inputs.append((args, kwargs))
        raise _Reached

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_Reached):
                call_model(model, batch)
    finally:
        handle.remove()
    if len(inputs) != len(batches):
        raise ValueError(f"{type(model).__name__} did not reach its first block on every calibration batch")
    return inputs


def _runner(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> Callable[[], None]:
    def run() -> None:
        for a, k in inputs:
            block(*a, **k)
    return run


def _first(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output[0]


def calibrate(model: nn.Module, views: Sequence[LayerView], batches: Sequence[Any], *, hessian: bool,
              visit: Visit, sequential: bool | None = None) -> None:
    """Gather each managed layer's :class:`Stats` and call ``visit(indices, stats, blockwise)`` once
    per group (``blockwise``: the group is one block, else the layers outside the blocks):
    first the layers outside the blocks (simple path), then each block in order (sequential path),
    as the module docstring describes. ``visit`` may change the group's weights (prune them);
    later groups see the result.

    Args:
        sequential: ``None`` finds a transformer's blocks (:func:`find_blocks`); ``False`` uses the
            simple path for every layer.
    """
    blocks = find_blocks(model, views) if sequential is not False else None
    if sequential and blocks is None:
        raise ValueError(f"sequential calibration needs a Hugging Face transformer's blocks; "
                         f"{type(model).__name__} has none")
    place = {}
    for b, block in enumerate(blocks or []):
        for sub in block.modules():
            place[id(sub)] = b
    groups: list[list[int]] = [[] for _ in range(len(blocks or []))]
    outside = []
    for i, v in enumerate(views):
        (groups[place[id(v.module)]] if id(v.module) in place else outside).append(i)
    with _calibrating(model):
        if outside:
            mine = {i: views[i] for i in outside}
            visit(outside, _gather(mine, hessian, lambda: [call_model(model, b) for b in batches]), False)
        if not blocks:
            return
        inputs = _block_inputs(model, blocks[0], batches)
        for block, group in zip(blocks, groups):
            if group:
                mine = {i: views[i] for i in group}
                visit(group, _gather(mine, hessian, _runner(block, inputs)), True)
            for j, (a, k) in enumerate(inputs):
                inputs[j] = _with_hidden(a, k, _first(block(*a, **k)))
