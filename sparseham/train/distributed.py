"""Multi-process training with torchrun: process-group set-up and the rank-0 rule.

``torchrun --nproc_per_node=N train.py ...`` (or ``-m sparseham train ...``) sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; this
module joins the group (gloo on CPU, nccl on CUDA) and wraps the model in
``DistributedDataParallel``. Only rank 0 writes the run directory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from sparseham import sharding

__all__ = ["Dist", "init_distributed", "shard_model", "wrap_model", "rank_digests", "broadcast_masks_",
           "check_ranks_agree"]


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


def init_distributed(device: torch.device) -> Dist:
    """Join the torchrun process group when ``WORLD_SIZE > 1``; a no-op otherwise."""
    if "RANK" in os.environ and "WORLD_SIZE" not in os.environ:
        raise ValueError("RANK is set but WORLD_SIZE is not: start several processes with torchrun "
                         "(it sets both), or unset RANK for one process")
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


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
