"""Shared test set-up.

The suite runs on 2-core machines that are often busy; intra-op threads then contend and a
small op can stall for tens of milliseconds. One thread per process (also for the training
subprocesses the end-to-end tests start) keeps timings stable.
"""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
