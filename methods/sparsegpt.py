r"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot"), one layer at a time with weight reconstruction.

From the calibration inputs :math:`X` of a layer, :math:`H = 2 X^\top X`; dampened by 1% of its mean
diagonal and inverted through Cholesky, :math:`U = \mathrm{chol}(H^{-1})^\top`. Columns are treated
in blocks of 128. At the start of a block the mask keeps the highest
:math:`w_{ij}^2 / U_{jj}^2` of the whole block (under ``pattern: "n:m"``: of each group of ``m``
columns, when the group starts); then each column :math:`j` is pruned and its error
:math:`e = (w_j - q_j)/U_{jj}` is compensated on the later columns,
:math:`W_{:, j:} \leftarrow W_{:, j:} - e\, U_{j, j:}` (the OBS update, Alg. 1), lazily for the later
blocks. The kept weights change: this is a reconstruction, not only a mask.

Follows IST-DASLab/sparsegpt ``sparsegpt.py`` ``SparseGPT.fasterprune`` (``percdamp=0.01``,
``blocksize=128``) and the block-by-block calibration of its ``llama.py``; the tests match its
reconstructed weights (to 2e-6) and masks, on one layer and on a whole LLaMA. Deviation: each block
of the unstructured mask prunes its exact share of ``round(s * numel)`` (the reference prunes
``int(size * s) + 1`` per block).
"""

from __future__ import annotations

from . import register
from ._oneshot import OneShot

__all__ = ["SparseGPT"]


@register("sparsegpt")
class SparseGPT(OneShot):
    """SparseGPT one-shot pruning (see the module docstring); options: :class:`OneShotOptions`."""

    solver = "sparsegpt"
