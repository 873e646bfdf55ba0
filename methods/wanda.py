r"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models").

Each weight is scored by its magnitude times the norm of its input over the calibration data
(Eq. 1),

.. math:: S_{ij} = |W_{ij}| \cdot \lVert X_j \rVert_2,

and the scores are compared **per output** (each row of ``W`` loses the same number of weights);
under ``pattern: "n:m"`` the highest ``n`` of every ``m`` consecutive inputs of each output are
kept. No weight is updated. A transformer is calibrated block by block, each block on the outputs of
the already pruned blocks before it (:mod:`sparseham.oneshot.calibrate`), as the authors' code
(locuslab/wanda ``lib/prune.py`` ``prune_wanda`` and ``lib/layerwrapper.py``) does; the tests match
its masks exactly, layer by layer and on a whole LLaMA.

Deviation: with ``k = round(s * numel)`` not a multiple of the rows, the first ``k mod rows`` rows
lose one more weight, so the layer's count is exact (the reference prunes ``int(in * s)`` per
row). ``distribution: global`` and ``owl`` choose per-layer counts first
(:mod:`sparseham.oneshot.allocate`); the comparison stays per row.
"""

from __future__ import annotations

from . import register
from ._oneshot import OneShot

__all__ = ["Wanda"]


@register("wanda")
class Wanda(OneShot):
    """Wanda one-shot pruning (see the module docstring); options: :class:`OneShotOptions`."""

    solver = "wanda"
