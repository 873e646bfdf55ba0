"""Run by tests/test_fsdp.py under torchrun (2 processes, gloo): sharded top-k against one process."""

import gc

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from sparseham import sharding
from sparseham.topk import global_topk_masks, nm_mask, topk_mask

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
g = torch.Generator().manual_seed(0)
cases = [
    torch.randn(5, 3, generator=g),  # uneven rows: 3 + 2
    torch.randint(0, 3, (7, 4), generator=g).float(),  # heavy ties
    torch.randn(1, 6, generator=g),  # rank 1 holds an empty shard
    torch.where(torch.rand(6, 2, generator=g) < 0.3, torch.nan, torch.randn(6, 2, generator=g)),
]
for whole in cases:
    sharded = distribute_tensor(whole, mesh, [Shard(0)])
    for k in sorted({0, 1, whole.numel() // 3, whole.numel() // 2, whole.numel() - 1, whole.numel()}):
        got = sharding.full(topk_mask(sharded, k))
        assert torch.equal(got, topk_mask(whole, k)), (whole, k, got)
        assert int(got.sum()) == k
pieces = cases[:3]
for k in (1, 9, 20, sum(p.numel() for p in pieces) - 2):
    got = global_topk_masks([distribute_tensor(p, mesh, [Shard(0)]) for p in pieces], k)
    want = global_topk_masks(pieces, k)
    assert all(torch.equal(sharding.full(a), b) for a, b in zip(got, want)), k
nm = torch.randn(6, 8, generator=g)
assert torch.equal(sharding.full(nm_mask(distribute_tensor(nm, mesh, [Shard(0)]), 2, 4)), nm_mask(nm, 2, 4))
whole = torch.rand(5, 3, generator=g) > 0.5
like = distribute_tensor(torch.zeros(5, 3), mesh, [Shard(0)])
assert torch.equal(sharding.full(sharding.local_slice(whole, like)), whole)
print("ok", flush=True)
# The shutdown order of docs/design/fsdp.md: tensors first, then the group.
del cases, pieces, sharded, got, want, nm, whole, like, mesh
gc.collect()
dist.barrier()
dist.destroy_process_group()
