"""When masks change: periodic updates, RigL's cosine drop fraction, AC/DC's phase timeline.

Every function here is a pure function of host-side step counters, so methods can decide when to
act without reading the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["cosine_drop_fraction", "periodic", "Phase", "acdc_phases", "phase_at", "to_steps"]


def periodic(step: int, every: int, end: int, start: int = 0) -> bool:
    """True on steps ``start < step < end`` that are multiples of ``every``."""
    return start < step < end and step % every == 0


def cosine_drop_fraction(step: int, end: int, f0: float = 0.3) -> float:
    """RigL's drop fraction ``f(t) = f0 / 2 * (1 + cos(pi * t / end))`` for ``t < end``, else 0."""
    if step >= end:
        return 0.0
    return f0 / 2.0 * (1.0 + math.cos(math.pi * step / end))


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
    """The AC/DC timeline (Peste et al. 2021) over ``total`` steps.

    A dense warm-up of ``warmup`` steps, then compressed and decompressed phases of ``phase``
    steps each, starting compressed, then a final compressed phase of at least ``final`` steps
    that ends training. A leftover shorter than a phase joins the phase before it, and a
    compressed phase right before the final one merges with it, so training always ends in one
    compressed phase.
    """
    if min(warmup, final) < 0 or phase <= 0 or warmup + final > total:
        raise ValueError(
            f"AC/DC timeline does not fit: warm-up {warmup} + final {final} steps with phases of "
            f"{phase} steps in a run of {total} steps"
        )
    phases = [Phase(0, warmup, False)] if warmup else []
    start, sparse, stop = warmup, True, total - final
    while start < stop:
        end = start + phase if stop - start >= 2 * phase else stop
        phases.append(Phase(start, end, sparse))
        start, sparse = end, not sparse
    if phases and phases[-1].sparse:
        last = phases.pop()
        phases.append(Phase(last.start, total, True))
    else:
        phases.append(Phase(stop, total, True))
    return phases


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase that contains ``step`` (the last phase for steps past the end)."""
    for p in phases:
        if p.start <= step < p.end:
            return p
    return phases[-1]
