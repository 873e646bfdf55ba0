"""One way to compile a kernel: its own Dynamo cache, quiet on CPU-only machines, eager on failure.

Every compiled path of the step (the one-pass step, ``HAM(fused=True)``'s mirror pass and
``SignFlipTracker(fused=True)``) goes through :func:`compile_kernel`.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import warnings
from collections.abc import Callable
from functools import cache

import torch

__all__ = ["compile_kernel", "has_code_generator", "import_cpp_extension_quietly"]

_numbers = itertools.count()


def import_cpp_extension_quietly() -> None:
    """Inductor's CPU code generation imports ``torch.utils.cpp_extension``, which warns on a CUDA
    build of torch without a CUDA runtime ("No CUDA runtime is found"): on every CPU-only machine,
    a stray line on stderr at the first step. Import it with that warning silenced."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        log.setLevel(level)


@cache
def has_code_generator(device_type: str) -> bool:
    """Whether ``torch.compile`` can generate code here: a C++ compiler on CPU, Triton on CUDA."""
    if device_type == "cpu":
        return any(shutil.which(c) for c in ("g++", "c++", "clang++"))
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton()
    return False


def compile_kernel(fn: Callable, name: str, *, dynamic: bool | None, fallback: str) -> Callable:
    """``torch.compile(fn, fullgraph=True)`` under a code object of its own, falling back to eager.

    Dynamo keeps its graphs and its recompile limit (fatal under ``fullgraph``) per code object:
    each kernel gets a fresh one named ``{name}_{n}`` (``n`` counts kernels in the order of first
    use, so logs name them alike from run to run), and one kernel's recompiles never use up
    another's budget. If the first call fails to compile (no working compiler, a backend error),
    ``fn`` runs eagerly from then on, after one warning that ends with ``fallback`` (what to set for
    a faster uncompiled path): the same results, slower. While compiling is switched off
    (``TORCH_COMPILE_DISABLE=1``), ``fn`` runs eagerly without a warning: torch would run the
    function and only then fail on ``fullgraph``, and a second, eager run would apply the step twice.
    """
    def kernel(*args):
        return fn(*args)

    kernel.__code__ = kernel.__code__.replace(co_name=f"{name}_{next(_numbers)}")
    import_cpp_extension_quietly()
    return _EagerOnFailure(torch.compile(kernel, fullgraph=True, dynamic=dynamic), fn, name, fallback)


class _EagerOnFailure:
    def __init__(self, compiled: Callable, eager: Callable, name: str, fallback: str) -> None:
        self.fn, self.eager, self.name, self.fallback, self.tried = compiled, eager, name, fallback, False

    def __call__(self, *args):
        if torch._dynamo.config.disable:  # torch.compile switched off (TORCH_COMPILE_DISABLE=1)
            return self.eager(*args)
        if self.tried:
            return self.fn(*args)
        try:
            out = self.fn(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure; a real bug fails again eagerly
            warnings.warn(f"the {self.name} kernel did not compile ({type(err).__name__}: {str(err)[:200]}); "
                          f"it runs eagerly (slower; {self.fallback})", stacklevel=3)
            self.fn = self.eager
            out = self.fn(*args)
        self.tried = True
        return out
