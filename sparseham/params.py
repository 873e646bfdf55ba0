"""Which parameters a :class:`sparseham.MaskManager` manages, and the model under its wrappers.

The default knows a transformer (issue 31): the weights of ``Linear`` and convolution layers and of
Hugging Face's ``Conv1D`` (GPT-2's projections, a ``Linear`` with its weight stored transposed);
never a language-model head (the module a Hugging Face model returns from
``get_output_embeddings()``, or any layer whose weight is an ``nn.Embedding``'s weight); a tensor
shared by several modules (``b.weight = a.weight``) once, under its first name. Embeddings, norms
and biases are managed only when ``include`` names them.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .distributions import matches_any

__all__ = ["prunable_parameters", "managed_summary", "is_hf_conv1d", "unwrap"]

_PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (``.module``) and torch.compile (``._orig_mod``)."""
    while isinstance(getattr(model, "module", None), nn.Module) or isinstance(
            getattr(model, "_orig_mod", None), nn.Module):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is ``transformers``' ``Conv1D`` (checked by name: no import of transformers)."""
    kind = type(module)
    return kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers")


def _heads(model: nn.Module) -> dict[int, str]:
    """``id(weight) -> why`` of the weights that are language-model heads (see the module docstring)."""
    heads: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            heads.setdefault(id(module.weight), "tied to an embedding")
        getter = getattr(module, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        if isinstance(getattr(head, "weight", None), nn.Parameter):
            heads[id(head.weight)] = "LM head"
    return heads


def _default_layers(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[str], list[str]]:
    """The default managed pairs, the skipped heads (``"name (why)"``) and the tied names (``"b = a"``)."""
    heads, seen = _heads(model), {}
    chosen, skipped, tied = [], [], []
    for mn, m in model.named_modules():
        weight = getattr(m, "weight", None)
        if not (isinstance(m, _PRUNABLE) or is_hf_conv1d(m)) or not isinstance(weight, nn.Parameter):
            continue
        name = f"{mn}.weight" if mn else "weight"
        if id(weight) in heads:
            skipped.append(f"{name} ({heads[id(weight)]})")
        elif id(weight) in seen:
            tied.append(f"{name} = {seen[id(weight)]}")
        else:
            seen[id(weight)] = name
            chosen.append((name, weight))
    return chosen, skipped, tied


def prunable_parameters(
    model: nn.Module, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None
) -> list[tuple[str, nn.Parameter]]:
    """The managed ``(name, parameter)`` pairs of ``model``, each tensor once.

    By default the layers the module docstring lists. ``include`` globs over parameter names
    replace that default (a shared tensor still appears once, under its first name); ``exclude``
    globs remove names.
    """
    model = unwrap(model)
    exclude = tuple(exclude or ())
    if include is not None:
        include = tuple(include)
        chosen = [(n, p) for n, p in model.named_parameters() if matches_any(n, include)]
    else:
        chosen = _default_layers(model)[0]
    return [(n, p) for n, p in chosen if not matches_any(n, exclude)]


def managed_summary(
    model: nn.Module, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None
) -> str:
    """One line saying what :func:`prunable_parameters` manages and what the default skipped.

    Example: ``managing 8 tensors (0.1M weights): model.layers.0.self_attn.q_proj.weight, ...;
    skipped lm_head.weight (LM head); tied: b.weight = a.weight``.
    """
    model = unwrap(model)
    pairs = prunable_parameters(model, include, exclude)
    total = sum(p.numel() for _, p in pairs)
    names = [n for n, _ in pairs]
    shown = ", ".join(names[:3]) + (f", ... ({len(names) - 3} more)" if len(names) > 3 else "")
    size = f"{total / 1e6:.3g}M" if total >= 100_000 else f"{total:,}"
    line = f"managing {len(pairs)} tensors ({size} weights): {shown or 'none'}"
    _, skipped, tied = _default_layers(model)
    if include is None and skipped:
        line += f"; skipped {', '.join(skipped)}"
    if tied:
        line += f"; tied: {', '.join(tied)}"
    return line
