"""One-shot pruning of a trained model with calibration data (magnitude, Wanda, SparseGPT).

>>> from sparseham.oneshot import prune
>>> result = prune(model, batches, method="wanda", sparsity=0.5)      # or pattern=(2, 4)
>>> mm = MaskManager(model, opt, methods.get("static")(...))           # or the "wanda" method plug-in

:func:`prune` changes the weights in place (pruned ones exactly zero; SparseGPT also updates the
kept ones) and returns the masks. The registered methods ``magnitude``, ``wanda`` and
``sparsegpt`` run it in ``MaskManager``'s set-up and keep the mask during fine-tuning.
"""

from .allocate import OWL
from .calibrate import calibrate, find_blocks
from .layers import LayerView, Stats
from .prune import METHODS, PruneResult, layer_views, prune
from .solvers import SparseGPTResult, magnitude_keep, sparsegpt, wanda_keep

__all__ = ["METHODS", "OWL", "LayerView", "PruneResult", "SparseGPTResult", "Stats", "calibrate",
           "find_blocks", "layer_views", "magnitude_keep", "prune", "sparsegpt", "wanda_keep"]
