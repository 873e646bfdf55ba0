"""Shared test set-up.

The suite runs on 2-core machines that are often busy; intra-op threads then contend and a
small op can stall for tens of milliseconds. One thread per process (also for the training
subprocesses the end-to-end tests start) keeps timings stable.

Compiling a kernel costs seconds in every process that runs it, so ``torch.compile`` runs only in
the tests marked ``compiled`` (and the processes they start): the one-pass step, ``HAM(fused=True)``
and ``SignFlipTracker(fused=True)`` against their eager and staged references, and one training
run through the default compiled path. Everywhere else the same kernels run as their eager Python
functions (``TORCH_COMPILE_DISABLE=1``; set it to 0 to compile everywhere).
"""

import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")  # before torch reads its config

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _compile_only_where_marked(request, monkeypatch):
    if not request.node.get_closest_marker("compiled"):
        yield
        return
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "0")
    with torch._dynamo.config.patch(disable=False):
        yield


def skip_unless_required(reason: str, variable: str) -> None:
    """Skip for ``reason``, or fail when ``variable`` is ``1``: CI (``.ci/run``) provides what
    these tests need, so a skip there would hide a broken set-up."""
    import pytest

    if os.environ.get(variable) == "1":
        pytest.fail(f"{reason} ({variable}=1: CI provides it, so this must not skip)")
    pytest.skip(reason)
