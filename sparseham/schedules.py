"""When masks change: periodic updates, RigL's cosine drop fraction, GMP's cubic sparsity, AC/DC's
phase timeline.

Every function here is a pure function of host-side step counters, so methods can decide when to
act without reading the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["cosine_drop_fraction", "cubic_sparsity", "periodic", "Phase", "acdc_phases", "phase_at",
           "to_steps"]


def periodic(step: int, every: int, end: int, start: int = 0) -> bool:
    """True on steps ``start < step < end`` that are multiples of ``every``."""
    return start < step < end and step % every == 0


def cosine_drop_fraction(step: int, end: int, f0: float = 0.3) -> float:
    """RigL's drop fraction ``f(t) = f0 / 2 * (1 + cos(pi * t / end))`` for ``t < end``, else 0."""
    if step >= end:
        return 0.0
    return f0 / 2.0 * (1.0 + math.cos(math.pi * step / end))


def cubic_sparsity(step: int, start: int, end: int, initial: float, final: float) -> float:
    r"""Zhu & Gupta (2017)'s gradual pruning schedule, Eq. (1):

    .. math:: s_t = s_f + (s_i - s_f)\left(1 - \frac{t - t_0}{t_{end} - t_0}\right)^3

    ``initial`` before ``start``, ``final`` from ``end`` on; it prunes fast early, when many
    redundant weights remain, and slowly near the end.
    """
    if step <= start:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1.0 - (step - start) / (end - start)) ** 3


def to_steps(value: float, unit: str, total_steps: int, steps_per_epoch: int | None) -> int:
    """Convert a duration in ``unit`` (``fraction`` of training, ``epochs`` or ``steps``) to steps."""
    if unit == "fraction":
        return round(value * total_steps)
    if unit == "epochs":
        if not steps_per_epoch:
            raise ValueError("a schedule given in epochs needs steps_per_epoch")
        return round(value * steps_per_epoch)
    if unit == "steps":
        return int(value)
    raise ValueError(f"unknown schedule unit {unit!r}; choose fraction, epochs or steps")


@dataclass(frozen=True)
class Phase:
    """Steps ``[start, end)`` of one AC/DC phase; ``sparse`` is a compressed phase."""

    start: int
    end: int
    sparse: bool


def acdc_phases(total: int, warmup: int, phase: int, final: int) -> list[Phase]:
    """The AC/DC timeline (Peste et al. 2021) over ``total`` steps, as the authors' code runs it.

    A dense warm-up of ``warmup`` steps; then compressed and decompressed phases of ``phase``
    steps each, starting compressed, until ``total - final``; then a final compressed phase of
    ``final`` steps that ends training. The phase before the final one is always decompressed:
    where the alternation would end compressed, that compressed phase becomes part of the
    decompressed phase before it. A leftover shorter than a phase joins the phase before it.

    With 100 epochs, 10 / 5 / 15 this gives the authors' ImageNet list
    (IST-DASLab/ACDC, ``configs/neurips/iht_imagenet_resnet50_*_ep100.yaml``: pruner epochs
    ``[10, 10, 71]`` and ``[85, 20, 100]``, recycler ``[15, 10, 66]`` and ``[75, 20, 86]``):
    dense [0, 10), compressed [10, 15), dense [15, 20), ..., compressed [70, 75), dense [75, 85),
    compressed [85, 100). With 200 epochs, 10 / 20 / 30 it gives their CIFAR list (dense
    [0, 10), compressed [10, 30), ..., dense [150, 170), compressed [170, 200)).
    """
    if min(warmup, final) < 0 or phase <= 0 or warmup + final > total or final == 0:
        raise ValueError(
            f"AC/DC timeline does not fit: warm-up {warmup} + final {final} steps with phases of "
            f"{phase} steps in a run of {total} steps (the final compressed phase needs >= 1 step)"
        )
    phases = [Phase(0, warmup, False)] if warmup else []
    start, sparse, stop = warmup, True, total - final
    while start < stop:
        end = start + phase if stop - start >= 2 * phase else stop
        phases.append(Phase(start, end, sparse))
        start, sparse = end, not sparse
    if phases and phases[-1].sparse and (len(phases) > 1 and not phases[-2].sparse):
        last, before = phases.pop(), phases.pop()  # the decompressed phase absorbs it
        phases.append(Phase(before.start, last.end, False))
    elif phases and phases[-1].sparse:  # a compressed phase right after the start: no room to alternate
        last = phases.pop()
        phases.append(Phase(last.start, total, True))
        return phases
    phases.append(Phase(stop, total, True))
    return phases


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase that contains ``step`` (the last phase for steps past the end)."""
    for p in phases:
        if p.start <= step < p.end:
            return p
    return phases[-1]
