"""The mirror step's kernels: a for-loop, a foreach and a fused (compiled) one, and the norm cap.

Each kernel updates the parameters in place and returns, per tensor, two device tensors for the
diagnostics: how many entries' exponents reached the clamp (with ``count``; else ``[]``), and
whether the norm cap rescaled it (0 or 1). Nothing here reads a device value on the host (the
norm cap reads its per-tensor scales on the host only for CPU tensors, :data:`HOST_READS_FREE`).

The fused kernel is one compiled pass per tensor (torch.compile; Triton on CUDA).
``torch.compile`` caches one graph per parameter layout (number, shapes, dtypes and devices of
the tensors). ``dynamic=None`` lets the second distinct ``lr`` recompile once with ``lr``,
``alpha`` and ``beta`` as symbolic floats; after that a learning-rate schedule does not recompile.

Under the trust region the exponent lies in ``[-clamp, clamp]``, where a short Taylor polynomial
matches ``exp`` to float32 precision (:func:`exp_poly_degree`). The fused kernel evaluates it on
float32 tensors in place of ``exp``, with its degree a constant of the graph: one compiled function
per degree. The eager kernels keep ``exp``: there each Horner step is a pass of its own, and
degree 3 took 3.4x one ``_foreach_exp_`` over 12M float32 entries.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor
from torch.optim import Optimizer

from .compile import compile_kernel

__all__ = ["HOST_READS_FREE", "ULP", "cap_norms_", "compiled_pass", "exp_poly", "exp_poly_degree",
           "exp_poly_error_bound", "ham", "mirror_factor", "rescale_"]

Counts = tuple[list[Tensor], list[Tensor]]  # (clamped entries, capped flag) per tensor


ULP = 2.0**-24  # float32's unit roundoff (eps / 2): the relative error of one correct rounding
_MAX_DEGREE = 8  # beyond it, torch.exp
_INV_FACTORIAL = tuple(1.0 / math.factorial(k) for k in range(_MAX_DEGREE + 1))
_TINY = 2.0**-149  # the absolute error of a float32 product that underflows

#: Device types whose tensor values the host reads without a device synchronisation (host memory):
#: there the norm cap skips the multiply for tensors it does not rescale (:func:`rescale_`).
HOST_READS_FREE = frozenset({"cpu"})


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def exp_poly_error_bound(clamp: float, degree: int) -> float:
    """A bound on the relative error of :func:`exp_poly` in float32 against ``exp``, on ``[-clamp, clamp]``.

    A running error analysis of Horner's rule ``t_k = a_k + e * t_{k+1}`` (``t_n = a_n``), with
    ``a_k = 1/k!`` rounded to float32, every product and sum rounded to nearest (relative error
    <= 2^-24, plus 2^-149 absolute where a product underflows; an FMA only drops a rounding),
    ``|e| <= c = clamp * (1 + 2^-23)`` (float32(clamp) may round up) and ``|t_k| <= T_k =
    sum_j a_j c^(j-k)``. Levels ``n-1 .. 1`` carry absolute errors. At level 0 the error of
    ``1 + e * t_1`` before its rounding, plus the Taylor remainder, is divided by
    ``exp(e) >= e^-c``; the remainder is ``c^(n+1) / (n+1)! * e^c`` relative (Lagrange form); the
    final rounding multiplies by at most ``1 + 2^-24``.

    Returns:
        The bound, relative (compare with :data:`ULP`).
    """
    c, n = clamp * (1 + 2.0**-23), degree
    a, a32 = _INV_FACTORIAL[: n + 1], [_f32(x) for x in _INV_FACTORIAL[: n + 1]]
    big = [sum(a[j] * c ** (j - k) for j in range(k, n + 1)) for k in range(n + 1)]
    err = abs(a32[n] - a[n])
    for k in range(n - 1, 0, -1):
        prod = c * (big[k + 1] + err) * (1 + ULP) + _TINY  # |fl(e * t_{k+1})|
        err = (abs(a32[k] - a[k]) + c * err + ULP * c * (big[k + 1] + err) + _TINY
               + ULP * (a32[k] + prod))
    last = c * err + ULP * c * (big[1] + err) + _TINY  # |fl(e * t_1) - e * t_1(exact)|
    rho = (c ** (n + 1) / math.factorial(n + 1) + last) * math.exp(c)
    return (1 + rho) * (1 + ULP) - 1  # and the rounding of the final sum


@cache
def exp_poly_degree(clamp: float) -> int | None:
    """The smallest degree whose Taylor polynomial replaces ``exp`` on ``[-clamp, clamp]`` in float32.

    The degree is the smallest ``n <= 8`` with :func:`exp_poly_error_bound` at most 2 ulp, taking
    the ulp as float32's unit roundoff 2^-24 (so the bound is 2^-23 relative, at most 2 ulp of the
    result's own spacing). Taylor, not minimax: its coefficients are 1/k! and it is exact at 0.

    Returns:
        2 for clamp 0.005, 3 for 0.01 and 0.02 (the default), 4 for 0.05, 5 for 0.1, 6 for 0.2;
        ``None`` from clamp 0.283 on (then the kernels use ``torch.exp``).
    """
    if not 0 < clamp < 1:  # the bound grows with clamp and exceeds 2 ulp long before 1
        return None
    return next((n for n in range(1, _MAX_DEGREE + 1) if exp_poly_error_bound(clamp, n) <= 2 * ULP), None)


def exp_poly(e: Tensor, degree: int) -> Tensor:
    """``1 + e*(1 + e*(1/2 + e*(1/6 + ...)))`` to ``e^degree / degree!``, in ``e``'s dtype."""
    t = _INV_FACTORIAL[degree]
    for k in range(degree - 1, -1, -1):
        t = e * t + _INV_FACTORIAL[k]
    return t


def mirror_factor(s: Tensor, g: Tensor, lr, alpha, beta, clamp, degree: int | None) -> tuple[Tensor, Tensor]:
    """The mirror step's factor ``exp(clamp(-lr*(alpha*sign(s)*g + beta)))`` on one tensor, for
    the compiled kernels (this module's and :mod:`.one_pass`'s); also where the clamp was reached."""
    e = torch.sign(s) * g * (-lr * alpha) - lr * beta
    # NaN -> 0 (the clamp handles +-inf); a where() compiles to a vector select, nan_to_num
    # to a scalar loop.
    e = torch.where(e == e, e, 0.0)
    hit = e.abs() >= clamp
    e = torch.clamp(e, -clamp, clamp)
    # The degree is chosen for float32; float64 (and half types) keep exp.
    return (exp_poly(e, degree) if degree is not None and s.dtype == torch.float32 else torch.exp(e)), hit


def _ham_pass(params, grads, signs, lr: float, alpha: float, beta: float, clamp: float,
              count: bool, degree: int | None = None) -> list[Tensor]:
    hits = []
    for p, g, s in zip(params, grads, signs):
        factor, hit = mirror_factor(s, g, lr, alpha, beta, clamp, degree)
        if count:
            hits.append(hit.sum())  # a reduction in the same loop as the update
        p.mul_(factor)
    return hits


@cache
def compiled_pass(degree: int | None) -> Callable:
    """``_ham_pass`` compiled with ``degree`` as a closure constant: an int argument would turn
    symbolic at its second value, as ``lr`` does, and the Horner loop needs a Python int."""
    def ham_pass(params, grads, signs, lr, alpha, beta, clamp, count):
        return _ham_pass(params, grads, signs, lr, alpha, beta, clamp, count, degree)

    return compile_kernel(ham_pass, f"mirror_degree_{degree}", dynamic=None,
                          fallback="HAM(fused=False) runs the foreach path")


def _fused_ham(params, grads, signs, *, lr, alpha, beta, clamp, max_norm, count=True) -> Counts:
    """Apply the mirror step to every tensor in one compiled call (see ``sparseham.ham``).

    The norm cap runs after it as the eager foreach ``cap_norms_``: compiled into the same graph,
    inductor's CPU code for the two reductions cost about 4x an SGD step, the eager version 0.6x.
    """
    compiled = compiled_pass(exp_poly_degree(float(clamp)))
    hits = compiled(params, grads, signs, lr, float(alpha), float(beta), float(clamp), count)
    return list(hits), _cap_grouped(params, max_norm)


def _single_tensor_ham(params, grads, signs, *, lr, alpha, beta, clamp, max_norm, count=True) -> Counts:
    hits = []
    for p, g, s in zip(params, grads, signs):
        e = torch.sign(s).mul_(g).mul_(-lr * alpha)
        if beta != 0:
            e.sub_(lr * beta)
        # NaN (from a NaN gradient, or 0 * inf) means "no information": factor 1.
        e.nan_to_num_(nan=0.0).clamp_(-clamp, clamp)
        if count:
            hits.append(torch.count_nonzero(e.abs() >= clamp))
        p.mul_(e.exp_())
    capped = [c for p in params for c in cap_norms_([p], max_norm)] if max_norm is not None else []
    return hits, capped


def _multi_tensor_ham(params, grads, signs, *, lr, alpha, beta, clamp, max_norm, count=True) -> Counts:
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, signs])
    order = {id(p): i for i, p in enumerate(params)}
    hits: list[Tensor | None] = [None] * len(params)
    for (dev_params, dev_grads, dev_signs), _ in grouped.values():
        e = torch._foreach_sign(dev_signs)
        torch._foreach_mul_(e, dev_grads)
        torch._foreach_mul_(e, -lr * alpha)
        if beta != 0:
            torch._foreach_add_(e, -lr * beta)
        for p, t in zip(dev_params, e):  # no foreach nan_to_num; one fused clamp per tensor in the loop
            t.nan_to_num_(nan=0.0).clamp_(-clamp, clamp)
            if count:
                hits[order[id(p)]] = torch.count_nonzero(t.abs() >= clamp)
        torch._foreach_exp_(e)
        torch._foreach_mul_(dev_params, e)
    return (hits if count else []), _cap_grouped(params, max_norm)


def _cap_grouped(params: list[Tensor], max_norm: float | None) -> list[Tensor]:
    """:func:`cap_norms_` per device and dtype; the capped flags in the order of ``params``."""
    if max_norm is None:
        return []
    order = {id(p): i for i, p in enumerate(params)}
    capped: list[Tensor | None] = [None] * len(params)
    for (group,), _ in Optimizer._group_tensors_by_device_and_dtype([params]).values():
        for p, flag in zip(group, cap_norms_(group, max_norm)):
            capped[order[id(p)]] = flag
    return capped


def cap_norms_(tensors: list[Tensor], max_norm: float) -> list[Tensor]:
    """Rescale, in place and on the device, every tensor whose L2 norm exceeds ``max_norm``.

    Returns:
        Per tensor, a 0-dim int64 device tensor: 1 where it was rescaled, else 0.
    """
    norms = torch.stack(torch._foreach_norm(tensors))
    # Squares overflow float32 once entries pass ~1.8e19 and the norm becomes inf; max|t| * sqrt(n)
    # bounds the norm and still caps then (a float64 norm would do too, at ~7x the cost on CPU).
    peaks = torch.stack([torch.maximum(-lo, hi) * math.sqrt(t.numel()) for t in tensors for lo, hi in
                         [torch.aminmax(t)]])
    return rescale_(tensors, norms, peaks, max_norm)


def rescale_(tensors: list[Tensor], norms: Tensor, peaks: Tensor, max_norm: float) -> list[Tensor]:
    """:func:`cap_norms_` from known norms and their overflow bounds ``max|t| * sqrt(numel)`` (one
    entry per tensor), as the one-pass step computes them in its own pass."""
    bound = torch.where(torch.isfinite(norms), norms, peaks)
    # A NaN or inf entry makes the bound non-finite: leave that tensor alone rather than spread it.
    scale = torch.where(torch.isfinite(bound), torch.clamp(max_norm / bound, max=1.0), 1.0)
    capped = scale < 1.0
    if scale.device.type in HOST_READS_FREE and type(scale) is Tensor:  # not a DTensor (FSDP)
        # The cap rarely fires: multiplying every tensor by 1 is a pass over all weights for nothing
        # (0.27x an SGD step on ResNet-18). Where the host reads the scales without a device sync,
        # only the capped tensors are multiplied; x * 1 == x bit for bit, so results do not change.
        todo = [i for i, c in enumerate(capped.tolist()) if c]
        if todo:
            torch._foreach_mul_([tensors[i] for i in todo], list(scale[todo].to(tensors[0].dtype).unbind()))
    else:
        torch._foreach_mul_(tensors, list(scale.to(tensors[0].dtype).unbind()))
    return list(capped.long().unbind())


def ham(
    params: list[Tensor],
    grads: list[Tensor],
    signs: list[Tensor] | None = None,
    *,
    lr: float | Tensor,
    alpha: float,
    beta: float,
    clamp: float = 0.02,
    max_norm: float | None = None,
    foreach: bool | None = None,
    fused: bool | None = None,
    count: bool = True,
) -> tuple[list[Tensor], list[Tensor]]:
    r"""Functional mirror step, in place: ``p *= exp(clamp(-lr*(alpha*sign(s)*g + beta), -c, c))``.

    Args:
        params: tensors after the base step (:math:`x_{k+1/2}`), updated in place.
        grads: the raw gradients :math:`\nabla f(x_k)`.
        signs: the tensors whose sign is used (``None``: ``params`` themselves, HYP*).
        lr, alpha, beta, clamp, max_norm: see :class:`sparseham.HAM`.
        foreach, fused: implementation choice; the default is foreach.
        count: also count the entries whose exponent reaches the clamp.

    Returns:
        Per tensor, on its device: the number of entries whose exponent reached the clamp, and
        (with ``max_norm``) whether the norm cap rescaled the tensor; ``[]`` without ``max_norm``.
    """
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if signs is None:
        signs = params
    hyper = {"lr": lr, "alpha": alpha, "beta": beta, "clamp": clamp, "max_norm": max_norm, "count": count}
    if fused:
        return _fused_ham(params, grads, signs, **hyper)
    if foreach is False:
        return _single_tensor_ham(params, grads, signs, **hyper)
    return _multi_tensor_ham(params, grads, signs, **hyper)
