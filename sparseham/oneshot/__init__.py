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
from .prune import METHODS, PruneResult, check_request, layer_views, needs_calibration, prune
from .solvers import SparseGPTResult, magnitude_keep, sparsegpt, wanda_keep

__all__ = ["METHODS", "OWL", "LayerView", "PruneResult", "SparseGPTResult", "Stats", "calibrate",
           "check_request", "find_blocks", "layer_views", "magnitude_keep", "needs_calibration", "prune",
           "sparsegpt", "wanda_keep"]
