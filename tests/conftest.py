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


# The files whose tests start training processes of their own, longest first (measured serially on
# 2 cores: each holds tests of 20 to 80 s). Collected first, they start first: pytest-xdist then
# ends the run on short tests instead of one worker finishing a long one while the other idles.
LONG_FIRST = ("test_methods.py", "test_train.py", "test_run_safety.py", "test_reliability.py", "test_fsdp.py",
              "test_study.py", "test_packaging.py", "test_sweep_submitit.py", "test_end_to_end.py",
              "test_benchmarks.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: file order kept
