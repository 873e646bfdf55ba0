"""Shared benchmark helpers: interleaved timing, robust summaries, machine line, model shapes.

Timings on shared machines are noisy. :func:`interleaved` runs every variant once per round
(ABAB..., in an order that rotates each round), so a burst of load from a neighbour hits all
variants alike; :func:`summarize` reports the median with the interquartile range and min/max.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["QUICK_SHAPES", "Summary", "cpu_model", "interleaved", "isa", "isa_line", "machine",
           "model_shapes", "shapes_cli", "summarize", "verdict", "weight_shapes", "write_report"]


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


# Environment variables that change the timings: threads, glibc's allocator, the vector ISA.
_ENV = ("OMP_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
        "ATEN_CPU_CAPABILITY", "TORCHINDUCTOR_CPP_MARCH")


def cpu_model() -> str:
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
    return (f"{cpu_model()}, {os.cpu_count()} cores, vector ISA {isa()}, "
            f"torch threads {torch.get_num_threads()}, "
            f"load {load:.1f}; torch {torch.__version__}, Python {platform.python_version()}"
            + (f"; {' '.join(env)}" if env else ""))


def isa() -> str:
    """The vector ISA torch's CPU kernels use here (``ATEN_CPU_CAPABILITY`` can lower it)."""
    return torch.backends.cpu.get_cpu_capability()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            return set(next((line.split(":", 1)[1] for line in fh if line.startswith("flags")), "").split())
    except OSError:
        return set()


def isa_line() -> str:
    """One line: the ISA in use, and whether it is the CPU's own or a lower one chosen by
    ``ATEN_CPU_CAPABILITY`` (an AVX2 run emulated on an AVX-512 CPU, say)."""
    own = "AVX512" if "avx512f" in _cpu_flags() else "AVX2" if "avx2" in _cpu_flags() else "unknown"
    used = isa()
    if used == own or own == "unknown":
        return f"vector ISA: {used} (the CPU's own)"
    march = os.environ.get("TORCHINDUCTOR_CPP_MARCH", "native")
    return (f"vector ISA: {used}, lowered from the CPU's {own} by ATEN_CPU_CAPABILITY (ATen's kernels and "
            f"the C++ one-pass loop use {used}; inductor's code -march={march}): an emulation, the memory "
            "system and cores are this CPU's")


def verdict(name: str, value: float, target: float, *, upper: bool = True, unit: str = "x") -> str:
    """``name: value, target <= t: MET`` (or ``>=`` with ``upper=False``), or by how much it is missed."""
    met = value <= target if upper else value >= target
    miss = "" if met else f" by {abs(value - target):.2f}{unit}"
    return (f"{name}: {value:.2f}{unit}, target {'<=' if upper else '>='} {target}{unit}: "
            f"{'MET' if met else 'NOT MET' + miss}")


def model_shapes(name: str) -> list[tuple[int, ...]]:
    """Parameter shapes of ``torchvision.models.<name>()`` (built on the meta device: no memory)."""
    import torchvision

    with torch.device("meta"):
        model = getattr(torchvision.models, name)(weights=None)
    return [tuple(p.shape) for p in model.parameters()]


QUICK_SHAPES = [(64, 16, 3, 3), (128, 64)]  # --quick: a smoke run, two small tensors


def weight_shapes(name: str) -> list[tuple[int, ...]]:
    """The weight tensors' shapes (ndim >= 2) of ``torchvision.models.<name>()``; ``QUICK_SHAPES``
    for ``"quick"``."""
    return QUICK_SHAPES if name == "quick" else [s for s in model_shapes(name) if len(s) >= 2]


def shapes_cli(prog: str, doc: str, argv: list[str] | None, *, shapes: tuple[str, ...],
               repeats: int) -> tuple[list[str], int, Path | None]:
    """The command line of the scripts that time steps over model weights: ``--shapes`` (one of
    ``shapes``; ``both`` means ResNet-18 and ResNet-50), ``--repeats``, ``--threads`` (set here),
    ``--json`` and ``--quick``. Prints the machine line; returns (shape names, repeats, json path)."""
    parser = argparse.ArgumentParser(prog=f"python benchmarks/{prog}", description=doc.split("\n")[0])
    parser.add_argument("--shapes", choices=shapes, default=shapes[0])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="smoke run: two small tensors, 2 repeats")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine())
    if args.quick:
        return ["quick"], 2, args.json
    return (["resnet18", "resnet50"] if args.shapes == "both" else [args.shapes]), args.repeats, args.json


def write_report(json_path: Path | None, **entries) -> dict:
    """The report every benchmark returns: the machine line and its entries, also as JSON if asked."""
    report = {"machine": machine(), **entries}
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2))
    return report
