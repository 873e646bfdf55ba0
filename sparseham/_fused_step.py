r"""The one-pass step: base optimizer, mirror step, masks and sign-flip count in one pass per tensor.

The staged pipeline (:class:`sparseham.MaskManager`, :class:`sparseham.HAM`) passes over every
weight once per stage: mask the gradient, the base step, the mirror step, re-mask the weight and
the optimizer state, compare signs. This module is the one place where those stages meet: per
tensor, one compiled function (``torch.compile``: C++ on CPU, Triton on CUDA) reads ``p``, ``g``,
the optimizer state, the 1-byte mask and the 1-byte sign code once, does every stage in
registers, and writes ``p``, the state and the code once. The math of each stage stays in its own
module and is called from here: the mirror factor (``_ham_kernels._mirror_factor``), the tracker
update (``tracking._track``); the base steps below follow ``torch.optim`` line by line:

.. math::
    \text{SGD:}\quad d &= g + \lambda p,\quad b \leftarrow \mu b + (1-\tau) d,\quad
        d \leftarrow d + \mu b \text{ (nesterov) or } b,\quad p \leftarrow p - \eta d \\
    \text{Adam:}\quad d &= g + \lambda p \text{ (AdamW: } p \leftarrow p(1-\eta\lambda)\text{)},\quad
        m \leftarrow m + (1-\beta_1)(d - m),\quad v \leftarrow \beta_2 v + (1-\beta_2) d^2, \\
        p &\leftarrow p - \frac{\eta}{1-\beta_1^t}\, \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

with ``g`` the masked gradient (what the staged pipeline leaves in ``p.grad``), then the mirror
step with the same ``g``, then ``p``, ``b``, ``m``, ``v`` times the mask, then the sign code.
The results equal the staged pipeline's to float rounding (``tests/test_fused_step.py``); the
exponential is the polynomial of ``_ham_kernels.exp_poly_degree`` where the clamp allows it.
One difference is visible: ``p.grad`` keeps the unmasked gradient (writing the masked one back
would be a fifth stream of 4 bytes per weight, and nothing after the step reads it).

Compiled once per *kind* of step (a :class:`_Spec`: optimizer, flags, polynomial degree). On CPU
one compiled function per tensor with ``dynamic=True``: tensor sizes and every hyperparameter are
symbolic, so new shapes, a learning rate schedule, Adam's bias corrections and a different
``alpha`` do not recompile, and inductor emits a single loop per tensor that stores and reduces
together (a graph over a whole model's list of tensors took minutes to compile and emitted
reduction loops that recompute the chain, ``benchmarks/one_pass_probe.py``). Each call costs about
100 us of host time here (dynamo's guards and wrappers). On CUDA (:data:`GROUPED`) a group's
tensors step in one compiled graph over their layout instead, one host call per group, the floats
symbolic from their second value. A kernel that fails to compile runs its same Python function
eagerly, after one warning.

:func:`unsupported` says when the one-pass step does not apply (then the staged path runs).
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import torch
from torch import Tensor
from torch.optim import SGD, Adam, AdamW, Optimizer
from torch.optim.optimizer import _get_scalar_dtype

from . import sharding
from ._ham_kernels import _mirror_factor, import_cpp_extension_quietly
from .tracking import _track

__all__ = ["Stages", "unsupported"]


@dataclass
class Stages:
    """The stages :class:`sparseham.MaskManager` hands to the one-pass step, per managed tensor.

    Attributes:
        masks: parameter -> its bool mask (gradient, weight and state are multiplied by it).
        track: parameter -> ``(code, counts, mask or None, hist or None)`` of the sign-flip tracker,
            on the steps the tracker compares (else empty).
    """

    masks: dict[Tensor, Tensor] = field(default_factory=dict)
    track: dict[Tensor, tuple[Tensor, Tensor, Tensor | None, Tensor | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Spec:
    """What one compiled function does: one per distinct value (its flags are graph constants)."""

    kind: str  # "sgd" or "adam"
    momentum: bool = False  # SGD keeps a buffer
    nesterov: bool = False
    weight_decay: bool = False
    decoupled: bool = False  # AdamW
    mirror: bool = False
    pre_sign: bool = False  # HYP: the sign of x_k, not of the half step
    degree: int | None = None  # the polynomial exp's degree (None: torch.exp)
    count: bool = False  # count the entries whose exponent reached the clamp
    norm: bool = False  # the norm cap's norm and overflow bound of the result
    masked: bool = False
    tracked: bool = False
    split: bool = False  # the tracker splits flips by a mask
    hist: bool = False


def _base_sgd(p: Tensor, d: Tensor, buf: Tensor | None, hyper, spec: _Spec):
    lr, momentum, dampening, wd = (hyper[i] for i in range(4))
    if spec.weight_decay:
        d = d + wd * p
    if spec.momentum:
        buf = buf * momentum + (1 - dampening) * d
        d = d + momentum * buf if spec.nesterov else buf
    return p - lr * d, (buf,)


def _base_adam(p: Tensor, d: Tensor, m: Tensor, v: Tensor, hyper, spec: _Spec):
    lr, step_size, bc2_sqrt, beta1, beta2, eps, wd = (hyper[i] for i in range(7))
    if spec.weight_decay:
        if spec.decoupled:
            p = p * (1 - lr * wd)
        else:
            d = d + wd * p
    m = m + (1 - beta1) * (d - m)
    v = v * beta2 + (1 - beta2) * d * d
    return p - step_size * m / (torch.sqrt(v) / bc2_sqrt + eps), (m, v)


def _one_pass(spec: _Spec, p, g, state, mask, track, hits, norms, hyper, ham) -> None:
    """Every stage on one tensor; writes ``p``, ``state``, the tracker's code and counts, ``hits``
    and ``norms`` (the result's L2 norm and ``max|x| * sqrt(numel)``, for the norm cap)."""
    m = mask.to(p.dtype) if spec.masked else None  # a uint8 view of the bool mask
    if m is not None:
        g = g * m
    if spec.kind == "sgd":
        x, new_state = _base_sgd(p, g, *state, hyper, spec)
    else:
        x, new_state = _base_adam(p, g, *state, hyper, spec)
    if spec.mirror:
        lr, alpha, beta, clamp = (ham[i] for i in range(4))
        factor, hit = _mirror_factor(p if spec.pre_sign else x, g, lr, alpha, beta, clamp, spec.degree)
        if spec.count:
            hits.add_(hit.sum(dtype=torch.int32 if p.numel() < 2**31 else torch.int64))
        x = x * factor
    if m is not None:
        x = x * m
        new_state = tuple(None if s is None else s * m for s in new_state)
    p.copy_(x)
    if spec.norm:  # reductions in the same loop: the cap needs no pass of its own to measure
        norms.copy_(torch.stack([torch.sqrt((x * x).sum()), x.abs().amax() * x.numel() ** 0.5]))
    for old, new in zip(state, new_state):
        if old is not None:
            old.copy_(new)
    if spec.tracked:
        code, counts, split, hist = track
        _track(x, code, counts, split if spec.split else None, hist if spec.hist else None)


def _one_pass_group(specs: tuple[_Spec, ...], *args) -> None:
    """:func:`_one_pass` over several tensors (``args``: one list per argument)."""
    for spec, *per_tensor in zip(specs, *args):
        _one_pass(spec, *per_tensor)


@cache
def _kernel(specs: tuple[_Spec, ...], grouped: bool) -> Callable:
    """The compiled step: per tensor (one spec; ``dynamic=True``: any size), or per group of tensors
    (``grouped``; one graph over their layout, the floats symbolic from their second value)."""
    if grouped:
        def one_pass(*args):
            _one_pass_group(specs, *args)
    else:
        (spec,) = specs

        def one_pass(*args):
            _one_pass(spec, *args)

    # Dynamo keeps its graphs and its recompile limit per code object: one per kernel (numbered in
    # the order of first use, so logs name them alike from run to run).
    number = _kernel.cache_info().currsize
    one_pass.__code__ = one_pass.__code__.replace(co_name=f"one_pass_{number}{'_grouped' if grouped else ''}")
    import_cpp_extension_quietly()
    compiled = torch.compile(one_pass, fullgraph=True, dynamic=None if grouped else True)
    return _EagerOnFailure(compiled, one_pass)


class _EagerOnFailure:
    """The compiled function; if its first call fails (no working compiler, a backend error), the
    same Python function runs eagerly from then on, after one warning: same results, slower."""

    def __init__(self, compiled: Callable, eager: Callable) -> None:
        self.fn, self.eager, self.tried = compiled, eager, False

    def __call__(self, *args) -> None:
        if self.tried:
            return self.fn(*args)
        try:
            self.fn(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure; a real bug fails again eagerly
            warnings.warn(f"the one-pass step did not compile ({type(err).__name__}: {str(err)[:200]}); "
                          "it runs eagerly (slower; ham.fused: false runs the staged foreach path)",
                          stacklevel=4)
            self.fn = self.eager
            self.fn(*args)
        self.tried = True


@cache
def _compiler_for(device_type: str) -> bool:
    """Whether ``torch.compile`` can generate code here: a C++ compiler on CPU, Triton on CUDA."""
    if device_type == "cpu":
        return any(shutil.which(c) for c in ("g++", "c++", "clang++"))
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton()
    return False


_DENSE_KINDS = {SGD: "sgd", Adam: "adam", AdamW: "adam"}

#: Device types whose tensors of a group step in one compiled call (one graph over their layout):
#: on CUDA a call costs more host time (~50-100 us) than a small tensor's kernel. On CPU, one call
#: per tensor: a graph over a whole model takes minutes to compile there (RESULTS section 11).
GROUPED = {"cuda"}


def unsupported(base: Optimizer) -> str | None:
    """Why the one-pass step cannot replace ``base.step()`` now (``None``: it can).

    It applies to ``torch.optim.SGD``, ``Adam`` and ``AdamW`` themselves (not subclasses, which may
    change the step) without ``maximize``, ``amsgrad``, ``capturable``, ``differentiable``, torch's
    own ``fused`` or tensor hyperparameters, with no step hooks on the base (they would not run), on
    dense contiguous float tensors (not FSDP shards) with a code generator for their device, and
    not inside a graph being compiled (the outer ``torch.compile`` traces the staged step).
    """
    if type(base) not in _DENSE_KINDS:
        return f"{type(base).__name__} has no one-pass step (SGD, Adam and AdamW do)"
    if base._optimizer_step_pre_hooks or base._optimizer_step_post_hooks:
        return "the base optimizer has step hooks"
    if torch.compiler.is_compiling():
        return "inside torch.compile"
    for group in base.param_groups:
        for key in ("maximize", "amsgrad", "capturable", "differentiable", "fused"):
            if group.get(key):
                return f"{key}=True"
        if any(isinstance(x, Tensor) for k, v in group.items() if k != "params"
               for x in (v if isinstance(v, (tuple, list)) else (v,))):
            return "a tensor hyperparameter"
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if sharding.is_sharded(p):
                return "sharded parameters"
            if (g.is_sparse or not p.is_floating_point() or g.dtype != p.dtype or not p.is_contiguous()
                    or not g.is_contiguous() or g.device != p.device):
                return "a sparse, non-float or non-contiguous tensor or gradient"
            if not _compiler_for(p.device.type):
                return f"no code generator for {p.device.type}"
    return None


def _state(base: Optimizer, p: Tensor, group: dict) -> tuple[list[Tensor | None], tuple[float, ...]]:
    """The state tensors and the base step's scalars, creating the state as ``torch.optim`` does."""
    state = base.state[p]
    if isinstance(base, SGD):
        momentum = group["momentum"]
        if not momentum:
            return [None], (group["lr"], 0.0, 0.0, group["weight_decay"])
        buf = state.get("momentum_buffer")
        dampening = group["dampening"]
        if buf is None:  # torch's first step sets the buffer to d: a zero buffer without dampening
            buf = state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            dampening = 0.0
        return [buf], (group["lr"], momentum, dampening, group["weight_decay"])
    if not state:
        state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())  # as torch's Adam (not capturable)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["step"] += 1
    t = float(state["step"])  # a CPU tensor, as torch keeps it: no device read
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    bias = (lr / (1 - beta1**t), (1 - beta2**t) ** 0.5)  # torch's step size and sqrt(bias correction 2)
    scalars = (lr, *bias, beta1, beta2, group["eps"], group["weight_decay"])
    return [state["exp_avg"], state["exp_avg_sq"]], scalars


def _flat(t: Tensor | None) -> Tensor | None:
    """A 1-D view; bool and int8 as uint8 (inductor vectorizes uint8 loads, not bool or int8 ones)."""
    if t is None:
        return None
    t = t.view(-1)
    return t.view(torch.uint8) if t.dtype in (torch.bool, torch.int8) else t


def _scalars(values: tuple, device: torch.device) -> Tensor | tuple[float, ...]:
    """The step's hyperparameters as the compiled function takes them. On CPU one float64 tensor:
    dynamo turns each Python float into a tensor of its own (5 us each, 10 per call). Elsewhere
    floats (inductor passes them to the Triton kernel as arguments); floats throughout, since an
    int where a float was (``dampening=0``) fails a type guard and recompiles."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=torch.float64)
    return tuple(map(float, values))


def step_group(base: Optimizer, group: dict, params: list[Tensor], *, mirrored: set[Tensor],
               ham: tuple | None, pre_sign: bool, degree: int | None, count: bool, cap: bool,
               stages: Stages | None) -> tuple[dict[Tensor, Tensor], dict[Tensor, Tensor]]:
    """The one-pass step of ``params`` (with gradients) of one param group of ``base``, in place.

    Args:
        mirrored: the tensors that get the mirror step (HAM's ``min_ndim``), with ``ham`` its
            ``(lr, alpha, beta, clamp)`` for this group or ``None`` (base step only).
        pre_sign, degree: HAM's ``sign="pre_step"``, and the polynomial exp's degree for its clamp.
        count: count the entries whose exponent reaches the clamp.
        cap: measure the mirrored tensors for the norm cap.
        stages: masks and tracker state for the managed tensors, from the MaskManager.

    Returns:
        For each mirrored tensor that stepped: with ``count``, its clamp count; with ``cap``, its
        norm and overflow bound (2 entries); device tensors.
    """
    kind = _DENSE_KINDS[type(base)]
    decoupled = isinstance(base, AdamW) or bool(group.get("decoupled_weight_decay"))
    masks = stages.masks if stages is not None else {}
    track = stages.track if stages is not None else {}
    hits: dict[Tensor, Tensor] = {}
    norms: dict[Tensor, Tensor] = {}
    grouped: dict[torch.device, list] = {}  # GROUPED devices: (spec, arguments) per tensor, one call each
    scalars_on: dict[tuple, Tensor | tuple] = {}  # hyperparameters, once per (values, device)
    for p in params:
        state, scalars = _state(base, p, group)
        mirror = ham is not None and p in mirrored
        mask, tracked = masks.get(p), track.get(p)
        spec = _Spec(
            kind,
            momentum=state[0] is not None,
            nesterov=bool(group.get("nesterov")),
            weight_decay=group["weight_decay"] != 0,
            decoupled=decoupled,
            mirror=mirror,
            pre_sign=mirror and pre_sign,
            degree=degree if mirror and p.dtype == torch.float32 else None,
            count=mirror and count,
            norm=mirror and cap and p.numel() > 0,
            masked=mask is not None,
            tracked=tracked is not None,
            split=tracked is not None and tracked[2] is not None,
            hist=tracked is not None and tracked[3] is not None,
        )
        n = torch.zeros((), dtype=torch.int64, device=p.device) if spec.count else None
        nm = torch.empty(2, dtype=p.dtype, device=p.device) if spec.norm else None
        if n is not None:
            hits[p] = n
        if nm is not None:
            norms[p] = nm
        if tracked is not None:
            code, counts, split, hist = tracked
            tracked = (_flat(code), counts, _flat(split), _flat(hist))
        for values in (scalars, ham or ()):
            if (values, p.device) not in scalars_on:
                scalars_on[values, p.device] = _scalars(values, p.device)
        args = (_flat(p), _flat(p.grad), [_flat(t) for t in state], _flat(mask), tracked, n, nm,
                scalars_on[scalars, p.device], scalars_on[ham or (), p.device])
        if p.device.type in GROUPED:
            grouped.setdefault(p.device, []).append((spec, args))
        else:
            _kernel((spec,), False)(*args)
    for todo in grouped.values():
        specs, per_tensor = zip(*todo)
        _kernel(specs, True)(*(list(a) for a in zip(*per_tensor)))
    return hits, norms
