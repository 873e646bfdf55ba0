"""The one-pass step on CPU as a small hand-written C++ loop, compiled on first use (issue 35).

Why not inductor's code: the one-pass step reads two or three 1-byte streams per weight (the
mask, the tracker's code, its split mask). Inductor's CPU code loads them with
``at::vec::Vectorized<uint8_t>::loadu(ptr, n)`` with ``n`` = the float vector width. On AVX-512
(``n == 16``) that is one 16-byte load. On AVX2 (``n == 8``) ATen's header has no fast path for
it: the bytes go through a stack buffer (fill with ones, ``memcpy`` 8 bytes, reload 32), and
the reload waits on a failed store forward, per 8 weights and per stream. Bool loads
(``VecMask::from``) are a scalar loop on both ISAs. No formulation of the same math avoids the
1-byte streams (the mask and the code are 1 byte per weight by design), so the kernel that reads
them is written out here: one ``for`` loop that g++/clang vectorize (``#pragma omp simd``,
``-march=native``), the same arithmetic in the same order as :func:`.one_pass.one_pass`, with the
hyperparameters rounded to float32 as inductor rounds them. Measurements: ``benchmarks/RESULTS.md``.

One shared library per :class:`~.one_pass.Spec` (its flags are ``#define`` s: no branch in the
loop), built on first use (about 0.6 s) and cached on disk (``$SPARSEHAM_KERNEL_CACHE``, else
``~/.cache/sparseham/kernels``) under a hash of the source, compiler, flags and CPU. The vector
ISA follows ``torch.backends.cpu.get_cpu_capability()`` (``ATEN_CPU_CAPABILITY=avx2``: AVX2
code). The loop is the custom op ``sparseham::one_pass_cpu`` (:func:`step`), called inside the
one-pass kernel's compiled graph; eagerly the Python reference runs instead (:mod:`.one_pass`).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["applies", "cache_dir", "flags", "load", "source", "step"]

_BODY = r"""
#include <cmath>
#include <cstdint>

extern "C" void one_pass(float* __restrict p, const float* __restrict g, float* __restrict s0,
                         float* __restrict s1, const uint8_t* __restrict mask, uint8_t* __restrict code,
                         const uint8_t* __restrict split, uint8_t* __restrict hist,
                         int64_t* __restrict counts, int64_t* __restrict hits, float* __restrict norms,
                         const double* __restrict hyper, const double* __restrict ham, int64_t n) {
  // Scalars as the compiled graph has them: float64 arithmetic, then rounded to float32.
  const float lr = (float)hyper[0];
#if ADAM
  const float step_size = (float)hyper[1], bc2 = (float)hyper[2], b1c = (float)(1.0 - hyper[3]),
              b2 = (float)hyper[4], b2c = (float)(1.0 - hyper[4]), eps = (float)hyper[5],
              wd = (float)hyper[6], decay = (float)(1.0 - hyper[0] * hyper[6]);
#else
  const float momentum = (float)hyper[1], damp = (float)(1.0 - hyper[2]), wd = (float)hyper[3];
#endif
#if MIRROR
  const float c1 = (float)(-ham[0] * ham[1]), c2 = (float)(ham[0] * ham[2]), clamp = (float)ham[3],
              nclamp = (float)(-ham[3]);
#endif
  int64_t hit = 0, total = 0, unmasked = 0;
  double sumsq = 0.0;  // the norm cap's sum of squares: float32 within a block, float64 across
  float peak = 0.0f;
  for (int64_t start = 0; start < n; start += BLOCK) {
  const int64_t end = start + BLOCK < n ? start + BLOCK : n;
  float block = 0.0f;
#pragma omp simd reduction(+ : hit, total, unmasked, block) reduction(max : peak)
  for (int64_t i = start; i < end; ++i) {
    const float p0 = p[i];
    float d = g[i];
#if MASKED
    const float f = (float)mask[i];
    d = d * f;
#endif
    const float gm = d;  // the masked gradient, for the mirror step
#if ADAM
    float pd = p0;
#if WEIGHT_DECAY && DECOUPLED
    pd = p0 * decay;
#elif WEIGHT_DECAY
    d = d + wd * p0;
#endif
    float m = s0[i] + b1c * (d - s0[i]);
    float v = s1[i] * b2 + b2c * d * d;
    float x = pd - step_size * m / (std::sqrt(v) / bc2 + eps);
#else
#if WEIGHT_DECAY
    d = d + wd * p0;
#endif
#if MOMENTUM
    float b = s0[i] * momentum + damp * d;
#if NESTEROV
    d = d + momentum * b;
#else
    d = b;
#endif
#endif
    float x = p0 - lr * d;
#endif
#if MIRROR
#if PRE_SIGN  // not a ?: on the flag: that kept the loop from vectorizing
    const float s = p0;
#else
    const float s = x;
#endif
    const float sg = (float)(s > 0.0f) - (float)(s < 0.0f);  // NaN -> 0, as the compiled sign
    float e = sg * gm * c1 - c2;
    e = e == e ? e : 0.0f;
    hit += std::fabs(e) >= clamp;
    e = e < nclamp ? nclamp : e;  // not fmin/fmax: those stay library calls and the loop scalar
    e = e > clamp ? clamp : e;
    float t = POLY_TOP;
    POLY_STEPS
    x = x * t;
#endif
#if MASKED
    x = x * f;
#if ADAM
    m = m * f;
    v = v * f;
#elif MOMENTUM
    b = b * f;
#endif
#endif
    p[i] = x;
#if ADAM
    s0[i] = m;
    s1[i] = v;
#elif MOMENTUM
    s0[i] = b;
#endif
#if NORM
    block += x * x;
    const float a = std::fabs(x);
    peak = a > peak ? a : peak;
#endif
#if TRACKED
    const int c = code[i], last = c & 3;
    const int flip = (last == 2 && x < 0.0f) | (last == 0 && x > 0.0f);
    const int now = x > 0.0f ? 2 : (x < 0.0f ? 0 : 1);
    code[i] = (uint8_t)((c & 28) | now | (flip << 4));
    total += flip;
#if SPLIT
    unmasked += flip & split[i];
#else
    unmasked += flip;  // no split mask: every flip is an unmasked weight's
#endif
#if HIST
    const int h = hist[i];
    hist[i] = (uint8_t)(h < 254 ? h + 2 * flip : h);
#endif
#endif
  }
  sumsq += block;
  }
#if COUNT
  hits[0] += hit;
#endif
#if TRACKED
  counts[0] += total - unmasked;
  counts[1] += unmasked;
#endif
#if NORM
  norms[0] = (float)std::sqrt(sumsq);
  norms[1] = sumsq != sumsq ? NAN : peak * (float)std::sqrt((double)n);  // NaN for a NaN entry, as amax
#endif
}
"""

_BLOCK = 1024  # entries whose squares are summed in float32 (16 lanes of 64), then added in float64
_FLAGS = ("momentum", "nesterov", "weight_decay", "decoupled", "mirror", "pre_sign", "count", "norm",
          "masked", "tracked", "split", "hist")


def applies(spec, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the C++ loop does this step: float32 on CPU, with the polynomial exp if mirrored
    (``torch.exp`` would stay a scalar libm call in the loop)."""
    return device.type == "cpu" and dtype == torch.float32 and (not spec.mirror or spec.degree is not None)


def source(spec) -> str:
    """The C++ source of ``spec``'s loop: its flags as ``#define`` s, then the loop."""
    lines = [f"#define ADAM {int(spec.kind == 'adam')}", f"#define BLOCK {_BLOCK}"]
    lines += [f"#define {name.upper()} {int(getattr(spec, name))}" for name in _FLAGS]
    degree = spec.degree or 0
    inv = [1.0 / math.factorial(k) for k in range(degree + 1)]
    # Horner, as mirror.exp_poly; hex floats: exact in the source, rounded to float32 as torch does
    lines.append(f"#define POLY_TOP {inv[degree].hex()}f")
    steps = (f"t = e * t + {inv[k].hex()}f;" for k in range(degree - 1, -1, -1))
    lines.append("#define POLY_STEPS " + " ".join(steps))
    return "\n".join(lines) + _BODY


def flags() -> list[str]:
    """The compiler flags: optimised, vectorized for this CPU, and no floating-point contraction
    (an FMA would round differently from torch's separate multiply and add)."""
    out = ["-O3", "-march=native", "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno",
           "-fno-trapping-math", "-shared", "-fPIC"]
    if platform.machine() in ("x86_64", "AMD64"):
        capability = torch.backends.cpu.get_cpu_capability()
        if capability != "AVX512":  # the ISA torch runs with (ATEN_CPU_CAPABILITY), not more
            out.append("-mno-avx512f")
        if capability not in ("AVX512", "AVX2"):
            out.append("-mno-avx2")
    return out


def cache_dir() -> Path:
    """Where the built libraries are kept."""
    root = os.environ.get("SPARSEHAM_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparseham" / "kernels"


def _cpu() -> str:
    """The CPU's model and feature flags (a library built with -march=native runs only there)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return "".join(line for line in fh if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return next((path for c in ("c++", "g++", "clang++") if (path := shutil.which(c))), None)


def _build(spec) -> Path:
    """The library of ``spec``, built now unless the cache has it."""
    compiler, code, args = _compiler(), source(spec), flags()
    if compiler is None:
        raise RuntimeError("no C++ compiler on PATH")
    key = hashlib.sha256("\0".join([code, compiler, *args, _cpu()]).encode()).hexdigest()[:24]
    folder = cache_dir()
    lib = folder / f"one_pass_{key}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:  # then an atomic rename: processes may race
        src, out = Path(tmp) / "one_pass.cpp", Path(tmp) / "one_pass.so"
        src.write_text(code)
        done = subprocess.run([compiler, *args, str(src), "-o", str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-300:]}")
        os.replace(out, lib)
    return lib


_LOADED: list = []  # the loaded C functions; an op argument indexes it


@cache
def load(spec) -> int:
    """Build (or find) and load ``spec``'s loop; its index for :func:`step`, or -1 after one
    warning if it cannot be built (then the one-pass step compiles its Python function instead)."""
    try:
        fn = ctypes.CDLL(str(_build(spec))).one_pass
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f"the C++ one-pass kernel did not build ({str(err)[:300]}); the step compiles with "
                      "torch.compile instead (slower on CPUs without AVX-512)", stacklevel=2)
        return -1
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 13 + [ctypes.c_int64]
    _LOADED.append(fn)
    return len(_LOADED) - 1


_LIB = torch.library.Library("sparseham", "FRAGMENT")
_LIB.define("one_pass_cpu(int kernel, Tensor(a!) p, Tensor g, Tensor(b!)? s0, Tensor(c!)? s1, Tensor? mask, "
            "Tensor(d!)? code, Tensor? split, Tensor(e!)? hist, Tensor(f!)? counts, Tensor(g!)? hits, "
            "Tensor(h!)? norms, Tensor hyper, Tensor ham) -> ()")


def _address(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _one_pass_cpu(kernel: int, p: Tensor, *tensors: Tensor | None) -> None:
    if p.numel():
        _LOADED[kernel](p.data_ptr(), *map(_address, tensors), p.numel())


_LIB.impl("one_pass_cpu", _one_pass_cpu, "CPU")
torch.library.register_fake("sparseham::one_pass_cpu", lambda *args: None, lib=_LIB)


def step(kernel: int, p: Tensor, g: Tensor, state: list, mask: Tensor | None, track: tuple | None,
         hits: Tensor | None, norms: Tensor | None, hyper: Tensor, ham: Tensor) -> None:
    """:func:`.one_pass.one_pass`'s arguments (flat, contiguous; uint8 views of the masks and
    codes; float64 hyperparameter tensors) through the loop :func:`load` returned as ``kernel``."""
    s0, s1 = (state + [None, None])[:2]
    code, counts, split, hist = track if track is not None else (None, None, None, None)
    torch.ops.sparseham.one_pass_cpu(kernel, p, g, s0, s1, mask, code, split, hist, counts, hits, norms,
                                     hyper, ham)
