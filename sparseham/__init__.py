"""sparseham: sparse training with Hyperbolic Aware Minimization (HAM).

The public API::

    from sparseham import HAM, MaskManager, SignFlipTracker, layer_densities
"""

from .distributions import layer_counts, layer_densities
from .ham import HAM, ham
from .masks import MaskInvariantError, MaskManager, prunable_parameters
from .method import Method
from .topk import global_topk_masks, topk_mask
from .tracking import SignFlipTracker

__all__ = [
    "HAM",
    "ham",
    "MaskManager",
    "MaskInvariantError",
    "Method",
    "SignFlipTracker",
    "global_topk_masks",
    "layer_counts",
    "layer_densities",
    "prunable_parameters",
    "topk_mask",
]
__version__ = "0.1.0"
