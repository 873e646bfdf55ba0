"""Which parameters a :class:`sparseham.MaskManager` manages, and the model under its wrappers."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .distributions import matches_any

__all__ = ["prunable_parameters", "unwrap"]

_PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (``.module``) and torch.compile (``._orig_mod``)."""
    while isinstance(getattr(model, "module", None), nn.Module) or isinstance(
            getattr(model, "_orig_mod", None), nn.Module):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def prunable_parameters(
    model: nn.Module, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None
) -> list[tuple[str, nn.Parameter]]:
    """The managed ``(name, parameter)`` pairs of ``model``.

    By default the weights of Linear and Conv layers, never biases or norm layers. ``include``
    globs over parameter names replace that default; ``exclude`` globs remove names.
    """
    model = unwrap(model)
    exclude = tuple(exclude or ())
    if include is not None:
        include = tuple(include)
        chosen = [(n, p) for n, p in model.named_parameters() if matches_any(n, include)]
    else:
        chosen = [
            (f"{mn}.weight" if mn else "weight", m.weight)
            for mn, m in model.named_modules()
            if isinstance(m, _PRUNABLE) and isinstance(getattr(m, "weight", None), nn.Parameter)
        ]
    return [(n, p) for n, p in chosen if not matches_any(n, exclude)]
