"""sparseham: sparse training with Hyperbolic Aware Minimization (HAM).

The public API::

    from sparseham import HAM, MaskManager, SignFlipTracker, layer_densities, methods

The top level of the package is the library a training loop imports. The training application
lives in the subpackages ``config``, ``data``, ``models`` and ``train`` (the ``sparseham``
command, :mod:`sparseham.cli`); the method plug-ins in ``sparseham.methods`` and the reports in
``sparseham.analysis``. The step itself (masking, the mirror step, the sign-flip kernels, the
one-pass executor) lives in the engine room ``sparseham._step``, which ``HAM``, ``MaskManager`` and
``SignFlipTracker`` call.
"""

import importlib

# Every name is imported on first use (PEP 562): ``import sparseham`` stays light, and the
# ``sparseham`` command reaches its own Ctrl-C handling before torch is loaded.
_PUBLIC = {
    "HAM": "ham", "MaskManager": "masks", "MaskInvariantError": "masks", "Method": "method",
    "SAM": "sam", "SignFlipTracker": "tracking", "global_topk_masks": "topk", "topk_mask": "topk",
    "layer_counts": "distributions", "layer_densities": "distributions", "prunable_parameters": "params",
}
_LAZY = ("methods", "analysis")

__all__ = sorted([*_PUBLIC, "methods"])
__version__ = "0.2.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC, *_LAZY})
