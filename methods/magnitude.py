r"""One-shot magnitude pruning of a trained model (``magnitude``), then a fixed mask.

Each layer keeps its largest :math:`|W_{ij}|`, compared over the whole layer (Han et al. 2015; the
baseline ``prune_magnitude`` of locuslab/wanda ``lib/prune.py``, which these tests match mask for
mask); under ``pattern: "n:m"`` the largest ``n`` of every ``m`` consecutive inputs of each output.
How many each layer keeps follows ``distribution`` (default ``uniform``, as the reference; ``global``
is one threshold over all layers) or, with ``owl: true``, OWL's outlier-weighted sparsities, whose
outlier ratios need calibration data (``MaskManager(..., data=batches)``). Unlike
``static`` with ``init: magnitude`` (pruning at initialization), this is meant for a pretrained model:
it accepts OWL and reports what it did in ``final.json``.

Deviation from the reference: exactly ``round(s * numel)`` weights are pruned per layer (the
reference's ``<=`` on the sorted scores prunes one more, and more on ties).
"""

from __future__ import annotations

from . import register
from ._oneshot import OneShot

__all__ = ["Magnitude"]


@register("magnitude")
class Magnitude(OneShot):
    """One-shot magnitude pruning (see the module docstring); options: :class:`OneShotOptions`."""

    solver = "magnitude"
