"""sparseham: sparse training with Hyperbolic Aware Minimization (HAM).

The public API::

    from sparseham import HAM, MaskManager, SignFlipTracker, layer_densities, methods

The top level of the package is the library a training loop imports. The training application
lives in the subpackages ``config``, ``data``, ``models`` and ``train`` (the ``sparseham``
command, :mod:`sparseham.cli`); the method plug-ins in ``sparseham.methods`` and the reports in
``sparseham.analysis``. ``methods`` and ``analysis`` are imported on first use, so ``import
sparseham`` stays light.
"""

import importlib

from .distributions import layer_counts, layer_densities
from .ham import HAM, ham
from .masks import MaskInvariantError, MaskManager
from .method import Method
from .params import prunable_parameters
from .sam import SAM
from .topk import global_topk_masks, topk_mask
from .tracking import SignFlipTracker

__all__ = [
    "HAM",
    "ham",
    "MaskManager",
    "MaskInvariantError",
    "Method",
    "SAM",
    "SignFlipTracker",
    "global_topk_masks",
    "layer_counts",
    "layer_densities",
    "methods",
    "prunable_parameters",
    "topk_mask",
]
__version__ = "0.2.0"

_LAZY = ("methods", "analysis")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
