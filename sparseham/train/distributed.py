"""Multi-process training with torchrun: process-group set-up and the rank-0 rule.

``torchrun --nproc_per_node=N train.py ...`` (or ``-m sparseham train ...``) sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; this
module joins the group (gloo on CPU, nccl on CUDA) and wraps the model in
``DistributedDataParallel``. Only rank 0 writes the run directory.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.constants import default_pg_timeout

from sparseham import sharding

__all__ = ["RENDEZVOUS_TIMEOUT_S", "Dist", "init_distributed", "process_env", "shard_model", "wrap_model",
           "rank_digests", "broadcast_masks_", "check_ranks_agree"]


@dataclass(frozen=True)
class Dist:
    """Where this process sits: ``rank`` of ``world_size``; ``local_rank`` picks its GPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any_true(self, flag: bool, device: torch.device) -> bool:
        """Agree across ranks: True when ``flag`` is True on any rank (a host sync)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], device=device)
        dist.all_reduce(t)
        return int(t) > 0


# torchrun starts every process at once; a rank that waits longer than this for the others waits
# for processes that were never started (WORLD_SIZE set by hand, a crashed peer).
RENDEZVOUS_TIMEOUT_S = 300.0
_TORCHRUN = ("start the processes with torchrun --nproc_per_node=N (it sets RANK, WORLD_SIZE, "
             "MASTER_ADDR and MASTER_PORT)")


def _env_int(name: str, low: int, expected: str, high: int | None = None) -> int | None:
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        raise ValueError(f"{name}={text!r} is not {expected}; {_TORCHRUN}, or unset {name} for one process")
    return value


def process_env() -> Dist:
    """This process's place as torchrun's variables give it, checked before anything waits or is
    written.

    Raises:
        ValueError: a variable that is not a whole number, ``WORLD_SIZE`` below 1, a ``RANK``
            outside ``0 .. WORLD_SIZE - 1``, ``RANK`` without ``WORLD_SIZE``, or several processes
            without ``RANK``, ``MASTER_ADDR`` or ``MASTER_PORT``.
    """
    if "RANK" in os.environ and "WORLD_SIZE" not in os.environ:
        raise ValueError("RANK is set but WORLD_SIZE is not: start several processes with torchrun "
                         "(it sets both), or unset RANK for one process")
    world = _env_int("WORLD_SIZE", 1, "a number of processes (at least 1)") or 1
    rank = _env_int("RANK", 0, "a process rank (0 or more)")
    local = _env_int("LOCAL_RANK", 0, "a local rank (0 or more)") or 0
    _env_int("MASTER_PORT", 1, "a TCP port (1 to 65535)", high=65535)
    if rank is not None and rank >= world:
        ranks = "rank 0 only" if world == 1 else f"ranks 0 to {world - 1}"
        raise ValueError(f"RANK={rank} must be below WORLD_SIZE={world} ({ranks}); {_TORCHRUN}")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if world > 1 and v not in os.environ]
    if missing:
        names = ", ".join(missing[:-1]) + " and " * (len(missing) > 1) + missing[-1]
        raise ValueError(f"WORLD_SIZE={world} but {names} {'are' if len(missing) > 1 else 'is'} not set: "
                         f"{_TORCHRUN}, or unset WORLD_SIZE for one process")
    if world > 1:
        _rendezvous_timeout()
    return Dist(rank or 0, world, local)


def _rendezvous_timeout() -> float:
    text = os.environ.get("SPARSEHAM_RENDEZVOUS_TIMEOUT_S", str(RENDEZVOUS_TIMEOUT_S))
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ValueError(f"SPARSEHAM_RENDEZVOUS_TIMEOUT_S={text!r} is not a number of seconds above 0")
    return value


def _wait_for_store(address: tuple[str, str], deadline: float) -> None:
    """Waits until rank 0's store accepts connections. torch's own client would wait too, but
    prints a C++ stack trace for each failed try."""
    while True:
        try:
            with socket.create_connection((address[0], int(address[1])), timeout=1.0):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise OSError(f"nothing listens there: {err.strerror or err}") from None
            time.sleep(0.2)


def init_distributed(device: torch.device) -> Dist:
    """Join the torchrun process group when ``WORLD_SIZE > 1``; a no-op otherwise.

    The rendezvous waits at most ``SPARSEHAM_RENDEZVOUS_TIMEOUT_S`` seconds (default
    ``RENDEZVOUS_TIMEOUT_S``) for the other processes; collectives keep torch's default timeout.

    Raises:
        ValueError: bad torchrun variables (:func:`process_env`), or the other processes did not
            join in time.
    """
    env = process_env()
    if not env.enabled:
        return Dist()
    if not dist.is_initialized():
        timeout = _rendezvous_timeout()
        deadline = time.monotonic() + timeout
        address = (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
        try:
            if env.rank:
                _wait_for_store(address, deadline)
            left = timedelta(seconds=max(deadline - time.monotonic(), 1.0))
            store, rank, world = next(dist.rendezvous("env://", timeout=left))
        except (dist.DistError, OSError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(
                f"rank {env.rank} of {env.world_size}: the other processes did not join at "
                f"{address[0]}:{address[1]} within {timeout:g} s ({reason}); {_TORCHRUN}, or set "
                "SPARSEHAM_RENDEZVOUS_TIMEOUT_S to wait longer") from None
        store.set_timeout(default_pg_timeout)  # what init_process_group does after its own rendezvous
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world)
    return Dist(dist.get_rank(), dist.get_world_size(), env.local_rank)


def shard_model(model: nn.Module) -> None:
    """FSDP2: ``fully_shard`` every module that holds parameters of its own, then the root, so a
    weight is gathered only around its own module's forward and backward. Every parameter
    becomes a ``DTensor`` split along dim 0; build the optimizer after this."""
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules())[1:]:
        if any(True for _ in module.parameters(recurse=False)):
            fully_shard(module)
    fully_shard(model)


def wrap_model(model: nn.Module, d: Dist, device: torch.device, sharded: bool = False) -> nn.Module:
    """Wrap ``model`` in DDP when running distributed (an FSDP model is already sharded)."""
    if not d.enabled or sharded:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def rank_digests(d: Dist, tensors: Iterable[torch.Tensor]) -> list[str]:
    """SHA-256 of ``tensors`` (bytes, in order) on every rank, gathered to all ranks (host sync).

    Used once at the end of training to prove that masks, weights, optimizer and tracker state
    stayed bitwise identical across ranks.
    """
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    mine = h.hexdigest()
    if not d.enabled:
        return [mine]
    gathered: list[str] = [""] * d.world_size
    dist.all_gather_object(gathered, mine)
    return gathered


def broadcast_masks_(manager, d: Dist) -> None:
    """Under DDP, rank 0's initial masks win (data-driven scores differ per data shard). Sharded
    masks need nothing: each rank holds its part of one mask."""
    if not d.enabled or manager.masks is None or any(sharding.is_sharded(m) for m in manager.masks):
        return
    masks = [m.to(torch.uint8) for m in manager.masks]
    for m in masks:
        dist.broadcast(m, 0)
    manager.set_masks([m.bool() for m in masks], expected=manager.expected)
    manager.mask_events.clear()


def check_ranks_agree(d: Dist, manager, optimizer) -> list[str]:
    """Every rank's digest of masks, weights, optimizer and tracker state; raises if they differ."""
    from sparseham.masks import MaskInvariantError

    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    tracker = manager.tracker.codes if manager.tracker is not None else []
    tensors = [*(manager.masks or []), *manager.model.parameters(), *state, *tracker]
    digests = rank_digests(d, tensors)
    if len(set(digests)) != 1:
        raise MaskInvariantError(f"ranks ended with different masks or weights: digests {digests}")
    return digests
