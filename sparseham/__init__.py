"""sparseham: sparse training with Hyperbolic Aware Minimization (HAM).

The public API::

    from sparseham import HAM, MaskManager, SignFlipTracker, layer_densities, methods

The top level of the package is the library a training loop imports. The training application
lives in the subpackages ``config``, ``data``, ``models`` and ``train`` (the ``sparseham``
command, :mod:`sparseham.cli`); the method plug-ins in ``sparseham.methods`` and the reports in
``sparseham.analysis``.
"""

import importlib
import sys
import types

# Every name is imported on first use (PEP 562): ``import sparseham`` stays light, and the
# ``sparseham`` command reaches its own Ctrl-C handling before torch is loaded.
_PUBLIC = {
    "HAM": "ham", "ham": "ham", "MaskManager": "masks", "MaskInvariantError": "masks", "Method": "method",
    "SAM": "sam", "SignFlipTracker": "tracking", "global_topk_masks": "topk", "topk_mask": "topk",
    "layer_counts": "distributions", "layer_densities": "distributions", "prunable_parameters": "params",
}
_LAZY = ("methods", "analysis")

__all__ = sorted([*_PUBLIC, "methods"])
__version__ = "0.2.0"


class _Package(types.ModuleType):
    """Keeps ``sparseham.ham`` the function: importing the submodule ``sparseham.ham`` sets the
    package attribute of that name, which an eager ``from .ham import ham`` used to override."""

    def __setattr__(self, name: str, value) -> None:
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


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
