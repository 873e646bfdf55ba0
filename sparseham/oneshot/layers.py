"""A managed layer seen as a matrix ``W`` of shape ``(out, in)`` acting on rows ``x`` of ``in`` inputs,
and the calibration statistics gathered from those rows.

- ``nn.Linear``: ``W`` is the weight.
- ``transformers`` ``Conv1D`` (GPT-2): the weight is stored ``(in, out)``; ``W`` is its transpose.
- ``nn.Conv1d`` / ``nn.Conv2d`` with ``groups=1`` and zero padding: a linear map over the unfolded
  input patches (im2col), so ``in = in_channels * prod(kernel)`` in the order of
  ``weight.flatten(1)``, and every output position of every image is one row. This is how GPTQ
  (Frantar et al. 2023) handles convolutions; the SparseGPT and Wanda repositories prune
  transformers only. Grouped, transposed and 3-D convolutions are refused (``ValueError``).

An N:M pattern groups ``m`` consecutive entries of a row of ``W``, i.e. consecutive inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..params import is_hf_conv1d

__all__ = ["LayerView", "Stats"]


class LayerView:
    """The managed weight of ``module`` (named ``name``) as a ``(out, in)`` matrix; see the module."""

    def __init__(self, name: str, module: nn.Module | None, weight: Tensor | None = None) -> None:
        self.name, self.module = name, module
        self.weight: Tensor = module.weight if module is not None else weight
        if module is None:
            self.kind = "tensor"  # a managed tensor that is no layer's weight (an embedding): magnitude only
        elif is_hf_conv1d(module):
            self.kind = "conv1d"
        elif isinstance(module, nn.Linear):
            self.kind = "linear"
        else:
            self.kind = "conv"

    def check_calibratable(self) -> None:
        """Raise ``ValueError`` unless :meth:`rows` supports the layer (see the module docstring)."""
        m = self.module
        if self.kind == "tensor":
            raise ValueError(f"{self.name}: calibrated pruning needs the weight of a Linear, transformers "
                             "Conv1D, Conv1d or Conv2d layer; exclude it or use method magnitude")
        if self.kind == "conv" and (not isinstance(m, (nn.Conv1d, nn.Conv2d)) or m.groups != 1
                                    or m.padding_mode != "zeros"):
            raise ValueError(f"{self.name}: calibrated pruning supports Conv1d and Conv2d with groups=1 and "
                             f"zero padding, not this {type(m).__name__} (groups={m.groups}, padding_mode="
                             f"{m.padding_mode!r}); exclude it or use method magnitude")

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)``."""
        w = self.weight
        if self.kind == "conv1d":
            return (w.shape[1], w.shape[0])
        return (w.shape[0], math.prod(w.shape[1:])) if w.dim() > 1 else (1, w.shape[0])

    def matrix(self) -> Tensor:
        """``W`` as a view of the weight (no copy)."""
        w = self.weight.detach()
        return w.t() if self.kind == "conv1d" else w.reshape(self.shape)

    def stored(self, matrix: Tensor) -> Tensor:
        """A ``(out, in)`` tensor laid out as the stored weight."""
        return matrix.t() if self.kind == "conv1d" else matrix.reshape(self.weight.shape)

    @torch.no_grad()
    def write_(self, matrix: Tensor) -> None:
        """Copy ``W = matrix`` into the weight, in its dtype."""
        self.weight.copy_(self.stored(matrix).to(self.weight.dtype))

    def rows(self, x: Tensor) -> Tensor:
        """The layer's input ``x`` as float32 rows ``(N, in)``."""
        if self.kind != "conv":
            return x.detach().reshape(-1, x.shape[-1]).float()
        m = self.module
        one_d = isinstance(m, nn.Conv1d)
        x = x.detach().float()
        if x.dim() == len(m.kernel_size) + 1:  # an unbatched input
            x = x.unsqueeze(0)
        if one_d:  # as a 2-D convolution over a height of 1
            x = x.unsqueeze(2)
        kernel, stride, dilation = (_pair(v, one_d) for v in (m.kernel_size, m.stride, m.dilation))
        x = F.pad(x, _padding(m, kernel, dilation, one_d))
        cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (B, in, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _pair(value: tuple[int, ...], one_d: bool) -> tuple[int, int]:
    return (1, value[0]) if one_d else (value[0], value[1])


def _padding(m: nn.Module, kernel: tuple[int, int], dilation: tuple[int, int], one_d: bool) -> list[int]:
    """``F.pad``'s ``[left, right, top, bottom]`` for the convolution's padding."""
    if m.padding == "valid":
        return [0, 0, 0, 0]
    if m.padding == "same":  # as torch does it: the odd pixel goes to the end
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return [total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2]
    pad = (0, m.padding[0]) if one_d else tuple(m.padding)
    return [pad[1], pad[1], pad[0], pad[0]]


class Stats:
    """Sums over the calibration rows ``x`` of one layer: ``sum x_j^2`` per input, and with
    ``hessian=True`` the Gram matrix ``sum x x^T`` (float32, on the weight's device)."""

    def __init__(self, columns: int, device: torch.device, hessian: bool) -> None:
        self.count = 0
        self.squares = torch.zeros(columns, device=device)
        self.gram = torch.zeros(columns, columns, device=device) if hessian else None

    def add(self, rows: Tensor) -> None:
        self.count += rows.shape[0]
        if self.gram is not None:
            self.gram.addmm_(rows.t(), rows)
        else:
            self.squares.add_(rows.square().sum(0))

    def norms(self) -> Tensor:
        """``||X_j||_2`` per input ``j`` over every calibration row (Wanda's activation norm)."""
        squares = self.gram.diagonal() if self.gram is not None else self.squares
        return squares.clamp(min=0).sqrt()

    def hessian(self) -> Tensor:
        """``H = 2 X^T X / N`` over the ``N`` calibration rows (SparseGPT's layer Hessian; the
        reference's normalisation differs by a constant, which changes nothing but its loss)."""
        return self.gram * (2.0 / max(self.count, 1))
