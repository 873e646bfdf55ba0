"""One way to compile a kernel: its own Dynamo cache, quiet on CPU-only machines, eager on failure.

Every compiled path of the step (the one-pass step, ``HAM(fused=True)``'s mirror pass and
``SignFlipTracker(fused=True)``) goes through :func:`compile_kernel`. A first step that compiles
says so in one line on stderr (:func:`notice`): seconds of silence otherwise look like a hang.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from functools import cache

import torch

__all__ = ["compile_enabled", "compile_kernel", "has_code_generator", "import_cpp_extension_quietly",
           "notice"]

_numbers = itertools.count()
_said: set[str] = set()


def compile_enabled() -> bool:
    """Whether ``torch.compile`` compiles at all here (``TORCH_COMPILE_DISABLE=1`` turns it off)."""
    disabled = getattr(torch._dynamo.config, "disable", None)
    if disabled is None:  # hidden: a monkeypatch's undo deletes a config entry; the environment decides
        disabled = os.environ.get("TORCH_COMPILE_DISABLE", "0") == "1"
    return not disabled


def notice(message: str) -> None:
    """Print ``message`` to stderr, once per process, when compiling is on (a line, not a warning:
    nothing is wrong, and warnings filters turned into errors must not stop the step)."""
    if message not in _said and compile_enabled():
        _said.add(message)
        print(message, file=sys.stderr, flush=True)


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


def compile_kernel(fn: Callable, name: str, *, dynamic: bool | None, fallback: str,
                   backend: str = "inductor") -> Callable:
    """``torch.compile(fn, fullgraph=True)`` under a code object of its own, falling back to eager.

    Dynamo keeps its graphs and its recompile limit (fatal under ``fullgraph``) per code object:
    each kernel gets a fresh one named ``{name}_{n}`` (``n`` counts kernels in the order of first
    use, so logs name them alike from run to run), and one kernel's recompiles never use up
    another's budget. If the first call fails to compile (no working compiler, a backend error),
    ``fn`` runs eagerly from then on, after one warning that ends with ``fallback`` (what to set for
    a faster uncompiled path): the same results, slower. While compiling is switched off
    (``TORCH_COMPILE_DISABLE=1``), ``fn`` runs eagerly without a warning: torch would run the
    function and only then fail on ``fullgraph``, and a second, eager run would apply the step twice.
    ``backend="eager"``: dynamo's graph runs as traced (for a graph of custom ops with nothing to
    generate).
    """
    def kernel(*args):
        return fn(*args)

    kernel.__code__ = kernel.__code__.replace(co_name=f"{name}_{next(_numbers)}")
    import_cpp_extension_quietly()
    compiled = torch.compile(kernel, fullgraph=True, dynamic=dynamic, backend=backend)
    return _EagerOnFailure(compiled, fn, name, fallback)


class _EagerOnFailure:
    def __init__(self, compiled: Callable, eager: Callable, name: str, fallback: str) -> None:
        self.fn, self.eager, self.name, self.fallback, self.tried = compiled, eager, name, fallback, False

    def __call__(self, *args):
        if not compile_enabled():  # torch.compile switched off (TORCH_COMPILE_DISABLE=1)
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
