"""Shared benchmark helpers: interleaved timing, robust summaries, machine line, model shapes.

Timings on shared machines are noisy. :func:`interleaved` runs every variant once per round
(ABAB..., in an order that rotates each round), so a burst of load from a neighbour hits all
variants alike; :func:`summarize` reports the median with the interquartile range and min/max.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Summary", "interleaved", "machine", "model_shapes", "summarize", "write_report"]


@dataclass(frozen=True)
class Summary:
    """Seconds per call: median, interquartile range and extremes over the repeats."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    def ms(self) -> str:
        return (f"{self.median * 1e3:8.2f} ms  [IQR {self.q1 * 1e3:.2f}-{self.q3 * 1e3:.2f}, "
                f"min {self.min * 1e3:.2f}, max {self.max * 1e3:.2f}]")


def summarize(samples: list[float]) -> Summary:
    a = np.asarray(samples, dtype=np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return Summary(float(med), float(q1), float(q3), float(a.min()), float(a.max()), len(a))


def interleaved(fns: dict[str, Callable[[], object]], *, repeats: int,
                warmup: int = 2) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, one call per function per round.

    Every function first runs ``warmup`` times (allocator, caches, lazy init). The order rotates
    by one each round, so no variant always runs right after the same neighbour.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
    return samples


# Environment variables that change the timings: threads and glibc's allocator.
_ENV = ("OMP_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line: CPU model, cores, torch threads, load, torch and Python versions, and env."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    env = [f"{k}={os.environ[k]}" for k in _ENV if k in os.environ]
    return (f"{_cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
            f"load {load:.1f}; torch {torch.__version__}, Python {platform.python_version()}"
            + (f"; {' '.join(env)}" if env else ""))


def model_shapes(name: str) -> list[tuple[int, ...]]:
    """Parameter shapes of ``torchvision.models.<name>()`` (built on the meta device: no memory)."""
    import torchvision

    with torch.device("meta"):
        model = getattr(torchvision.models, name)(weights=None)
    return [tuple(p.shape) for p in model.parameters()]


def write_report(json_path: Path | None, **entries) -> dict:
    """The report every benchmark returns: the machine line and its entries, also as JSON if asked."""
    report = {"machine": machine(), **entries}
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2))
    return report
