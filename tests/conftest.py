"""Shared test set-up.

The suite runs on 2-core machines that are often busy; intra-op threads then contend and a
small op can stall for tens of milliseconds. One thread per process (also for the training
subprocesses the end-to-end tests start) keeps timings stable.
"""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def skip_unless_required(reason: str, variable: str) -> None:
    """Skip for ``reason``, or fail when ``variable`` is ``1``: CI (``.ci/run``) provides what
    these tests need, so a skip there would hide a broken set-up."""
    import pytest

    if os.environ.get(variable) == "1":
        pytest.fail(f"{reason} ({variable}=1: CI provides it, so this must not skip)")
    pytest.skip(reason)
