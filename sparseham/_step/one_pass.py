r"""The one-pass step: base optimizer, mirror step, masks and sign-flip count in one pass per tensor.

The staged pipeline (:class:`sparseham.MaskManager`, :class:`sparseham.HAM`) passes over every
weight once per stage: mask the gradient, the base step, the mirror step, re-mask the weight and
the optimizer state, compare signs. This module is the one place where those stages meet: per
tensor, one compiled function (``torch.compile``: C++ on CPU, Triton on CUDA) reads ``p``, ``g``,
the optimizer state, the 1-byte mask and the 1-byte sign code once, does every stage in
registers, and writes ``p``, the state and the code once. The math of each stage stays in its own
module and is called from here, in the pipeline's order: the mask (:func:`.masking.masked`), the
base step (below, ``torch.optim`` line by line), the mirror factor (:func:`.mirror.mirror_factor`),
the mask again, the tracker update (:func:`.signflip.track`):

.. math::
    \text{SGD:}\quad d &= g + \lambda p,\quad b \leftarrow \mu b + (1-\tau) d,\quad
        d \leftarrow d + \mu b \text{ (nesterov) or } b,\quad p \leftarrow p - \eta d \\
    \text{Adam:}\quad d &= g + \lambda p \text{ (AdamW: } p \leftarrow p(1-\eta\lambda)\text{)},\quad
        m \leftarrow m + (1-\beta_1)(d - m),\quad v \leftarrow \beta_2 v + (1-\beta_2) d^2, \\
        p &\leftarrow p - \frac{\eta}{1-\beta_1^t}\, \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

with ``g`` the masked gradient (what the staged pipeline leaves in ``p.grad``), then the mirror
step with the same ``g``, then ``p``, ``b``, ``m``, ``v`` times the mask, then the sign code.
The results equal the staged pipeline's to float rounding (``tests/test_fused_step.py``); the
exponential is the polynomial of :func:`.mirror.exp_poly_degree` where the clamp allows it.
One difference is visible: ``p.grad`` keeps the unmasked gradient (writing the masked one back
would be a fifth stream of 4 bytes per weight, and nothing after the step reads it).

Compiled once per *kind* of step (a :class:`_Spec`: optimizer, flags, polynomial degree). On CPU
one compiled function per tensor with ``dynamic=True``: tensor sizes and every hyperparameter are
symbolic, so new shapes, a learning rate schedule, Adam's bias corrections and a different
``alpha`` do not recompile, and inductor emits a single loop per tensor that stores and reduces
together (a graph over a whole model's list of tensors took minutes to compile and emitted
reduction loops that recompute the chain, ``benchmarks/one_pass_probe.py``). Float32 tensors
(:data:`NATIVE`) go through a hand-written C++ loop instead (:mod:`.native`, a custom op that
dynamo traces alone): inductor's AVX2 code loads the 1-byte masks and codes through a stack buffer,
and its step was 4.5x an SGD step there (RESULTS.md section 15). Each call costs 50-100 us of host
time here (dynamo's guards and wrappers). On CUDA (:data:`GROUPED`) a group's
tensors step in one compiled graph over their layout instead, one host call per group, the floats
symbolic from their second value. A kernel that fails to compile runs its same Python function
eagerly, after one warning (:func:`.compile.compile_kernel`).

:func:`unsupported` says when the one-pass step does not apply (then the staged path runs);
:func:`step_group` runs it for one param group, :func:`base_step_only` runs torch's own step for
the tensors it leaves out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import torch
from torch import Tensor
from torch.optim import SGD, Adam, AdamW, Optimizer
from torch.optim.optimizer import _get_scalar_dtype

from .. import sharding
from . import masking, mirror, native, signflip
from .compile import compile_enabled, compile_kernel, has_code_generator, notice
from .plan import GroupPlan

__all__ = ["GROUPED", "NATIVE", "Spec", "TensorStep", "base_step_only", "flat", "kernel", "scalars",
           "step_group", "unsupported"]


@dataclass(frozen=True)
class Spec:
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


class TensorStep(NamedTuple):
    """The arguments of one tensor's compiled step, flat and in the kernel's order."""

    p: Tensor
    g: Tensor
    state: list[Tensor | None]  # SGD: [momentum buffer]; Adam: [exp_avg, exp_avg_sq]
    mask: Tensor | None  # uint8 view of the bool mask
    track: tuple | None  # (code, counts, mask, hist) of the tracker, uint8 views
    hits: Tensor | None  # the clamp count, added to
    norms: Tensor | None  # [L2 norm, max|x| * sqrt(numel)] of the result, written
    hyper: Tensor | tuple  # the base step's scalars (see _state)
    ham: Tensor | tuple  # the mirror step's (lr, alpha, beta, clamp)


def base_sgd(p: Tensor, d: Tensor, buf: Tensor | None, hyper, spec: Spec):
    lr, momentum, dampening, wd = (hyper[i] for i in range(4))
    if spec.weight_decay:
        d = d + wd * p
    if spec.momentum:
        buf = buf * momentum + (1 - dampening) * d
        d = d + momentum * buf if spec.nesterov else buf
    return p - lr * d, (buf,)


def base_adam(p: Tensor, d: Tensor, m: Tensor, v: Tensor, hyper, spec: Spec):
    lr, step_size, bc2_sqrt, beta1, beta2, eps, wd = (hyper[i] for i in range(7))
    if spec.weight_decay:
        if spec.decoupled:
            p = p * (1 - lr * wd)
        else:
            d = d + wd * p
    m = m + (1 - beta1) * (d - m)
    v = v * beta2 + (1 - beta2) * d * d
    return p - step_size * m / (torch.sqrt(v) / bc2_sqrt + eps), (m, v)


def one_pass(spec: Spec, p, g, state, mask, track, hits, norms, hyper, ham) -> None:
    """Every stage on one tensor, in the pipeline's order (see the module docstring); writes ``p``,
    ``state``, the tracker's code and counts, ``hits`` and ``norms``."""
    if spec.masked:  # stage 2
        g = masking.masked(g, mask)
    if spec.kind == "sgd":  # stage 3: the base step ...
        x, new_state = base_sgd(p, g, *state, hyper, spec)
    else:
        x, new_state = base_adam(p, g, *state, hyper, spec)
    if spec.mirror:  # ... and the mirror step
        lr, alpha, beta, clamp = (ham[i] for i in range(4))
        factor, hit = mirror.mirror_factor(p if spec.pre_sign else x, g, lr, alpha, beta, clamp, spec.degree)
        if spec.count:
            hits.add_(hit.sum(dtype=torch.int32 if p.numel() < 2**31 else torch.int64))
        x = x * factor
    if spec.masked:  # stage 4
        x = masking.masked(x, mask)
        new_state = tuple(None if s is None else masking.masked(s, mask) for s in new_state)
    p.copy_(x)
    if spec.norm:  # reductions in the same loop: the cap needs no pass of its own to measure
        norms.copy_(torch.stack([torch.sqrt((x * x).sum()), x.abs().amax() * x.numel() ** 0.5]))
    for old, new in zip(state, new_state):
        if old is not None:
            old.copy_(new)
    if spec.tracked:  # stage 5
        code, counts, split, hist = track
        signflip.track(x, code, counts, split if spec.split else None, hist if spec.hist else None)


def _one_pass_group(specs: tuple[Spec, ...], *args) -> None:
    """:func:`one_pass` over several tensors (``args``: one list per argument)."""
    for spec, *per_tensor in zip(specs, *args):
        one_pass(spec, *per_tensor)


@cache
def kernel(specs: tuple[Spec, ...], grouped: bool, native_kernel: int = -1) -> Callable:
    """The compiled step: per tensor (one spec; ``dynamic=True``: any size), or per group of tensors
    (``grouped``; one graph over their layout, the floats symbolic from their second value). With
    ``native_kernel`` (:func:`.native.load`) the graph is one call of the C++ loop; run eagerly
    (compiling disabled or failed), the Python reference."""
    fallback = "ham.fused: false runs the staged foreach path"
    if grouped:
        def step(*args):
            _one_pass_group(specs, *args)
        return compile_kernel(step, "one_pass_grouped", dynamic=None, fallback=fallback)
    (spec,) = specs
    if native_kernel >= 0:
        def native_step(*args):
            if torch.compiler.is_compiling():
                native.step(native_kernel, *args)
            else:
                one_pass(spec, *args)
        return compile_kernel(native_step, "one_pass", dynamic=True, fallback=fallback, backend="eager")

    def step(*args):
        one_pass(spec, *args)
    return compile_kernel(step, "one_pass", dynamic=True, fallback=fallback)


#: Whether float32 CPU tensors step through the C++ loop (:mod:`.native`); ``False``: inductor's code.
NATIVE = True
_announced: set[tuple] = set()


def _announce(dtype: torch.dtype, how: str) -> None:
    """One line when a first step compiles; ``how``: ``native``, ``inductor`` or ``grouped``
    (seconds measured on a busy 2-core EPYC, RESULTS.md section 15; none measured on CUDA)."""
    if (dtype, how) not in _announced:
        _announced.add((dtype, how))
        cost = {"native": ", ~2 s", "inductor": ", ~20 s"}.get(how, "")
        notice(f"sparseham: compiling the one-pass step for {str(dtype).removeprefix('torch.')} "
               f"(once per process{cost}; ham.fused: false skips it)")


def _per_tensor_kernel(spec: Spec, p: Tensor) -> Callable:
    """The per-tensor kernel for ``p``: the C++ loop where it applies."""
    use_native = NATIVE and compile_enabled() and native.applies(spec, p.dtype, p.device)
    _announce(p.dtype, "native" if use_native else "inductor")
    return kernel((spec,), False, native.load(spec) if use_native else -1)


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
            if not has_code_generator(p.device.type):
                return f"no code generator for {p.device.type}"
    return None


@contextmanager
def base_step_only(base: Optimizer, params: Sequence[Tensor]) -> Iterator[None]:
    """Within the block, ``base.step()`` steps exactly ``params`` (torch's own step, for the
    tensors the one-pass step leaves out): the base optimizer sees param groups holding only them.
    Its state is keyed by parameter, so the state of the others is untouched."""
    keep = {id(p) for p in params}
    groups = base.param_groups
    base.param_groups = [{**g, "params": [p for p in g["params"] if id(p) in keep]} for g in groups]
    try:
        yield
    finally:
        base.param_groups = groups


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


def flat(t: Tensor | None) -> Tensor | None:
    """A 1-D alias; bool and int8 as uint8 (inductor loads uint8 as vectors, bool and int8 one by
    one). Detached, not a view: dynamo guards a view's base, whose sizes 0 and 1 it specializes,
    so a 1x1 convolution or a linear weight would recompile the kernel (issue 35)."""
    if t is None:
        return None
    t = t.view(-1)
    return (t.view(torch.uint8) if t.dtype in (torch.bool, torch.int8) else t).detach()


def scalars(values: tuple, device: torch.device) -> Tensor | tuple[float, ...]:
    """The step's hyperparameters as the compiled function takes them. On CPU one float64 tensor:
    dynamo turns each Python float into a tensor of its own (5 us each, 10 per call). Elsewhere
    floats (inductor passes them to the Triton kernel as arguments); floats throughout, since an
    int where a float was (``dampening=0``) fails a type guard and recompiles."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=torch.float64)
    return tuple(map(float, values))


def _spec(kind: str, p: Tensor, state: list, group: dict, decoupled: bool, plan: GroupPlan) -> Spec:
    mirrored = plan.mirror is not None and p in plan.mirrored
    tracked = plan.stages.track.get(p)
    return Spec(
        kind,
        momentum=state[0] is not None,
        nesterov=bool(group.get("nesterov")),
        weight_decay=group["weight_decay"] != 0,
        decoupled=decoupled,
        mirror=mirrored,
        pre_sign=mirrored and plan.pre_sign,
        degree=plan.degree if mirrored and p.dtype == torch.float32 else None,
        count=mirrored and plan.count,
        norm=mirrored and plan.cap and p.numel() > 0,
        masked=p in plan.stages.masks,
        tracked=tracked is not None,
        split=tracked is not None and tracked.mask is not None,
        hist=tracked is not None and tracked.hist is not None,
    )


def step_group(base: Optimizer, group: dict, params: list[Tensor],
               plan: GroupPlan) -> tuple[dict[Tensor, Tensor], dict[Tensor, Tensor]]:
    """The one-pass step of ``params`` (with gradients) of one param group of ``base``, in place.

    Returns:
        For each mirrored tensor that stepped: with ``plan.count``, its clamp count; with
        ``plan.cap``, its norm and overflow bound (2 entries); device tensors.
    """
    kind = _DENSE_KINDS[type(base)]
    decoupled = isinstance(base, AdamW) or bool(group.get("decoupled_weight_decay"))
    hits: dict[Tensor, Tensor] = {}
    norms: dict[Tensor, Tensor] = {}
    grouped: dict[torch.device, list] = {}  # GROUPED devices: (spec, arguments) per tensor, one call each
    scalars_on: dict[tuple, Tensor | tuple] = {}  # hyperparameters, once per (values, device)
    ham = tuple(plan.mirror) if plan.mirror is not None else ()
    for p in params:
        state, base_scalars = _state(base, p, group)
        spec = _spec(kind, p, state, group, decoupled, plan)
        if spec.count:
            hits[p] = torch.zeros((), dtype=torch.int64, device=p.device)
        if spec.norm:
            norms[p] = torch.empty(2, dtype=p.dtype, device=p.device)
        tracked = plan.stages.track.get(p)
        if tracked is not None:
            tracked = (flat(tracked.code), tracked.counts, flat(tracked.mask), flat(tracked.hist))
        for values in (base_scalars, ham):
            if (values, p.device) not in scalars_on:
                scalars_on[values, p.device] = scalars(values, p.device)
        args = TensorStep(flat(p), flat(p.grad), [flat(t) for t in state], flat(plan.stages.masks.get(p)),
                          tracked, hits.get(p), norms.get(p), scalars_on[base_scalars, p.device],
                          scalars_on[ham, p.device])
        if p.device.type in GROUPED:
            grouped.setdefault(p.device, []).append((spec, args))
        else:
            _per_tensor_kernel(spec, p)(*args)
    for todo in grouped.values():
        specs, per_tensor = zip(*todo)
        _announce(per_tensor[0].p.dtype, "grouped")
        kernel(specs, True)(*(list(a) for a in zip(*per_tensor)))
    return hits, norms
