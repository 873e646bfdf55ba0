"""Tests for sparseham.data and sparseham.data.loaders: order, resume, DDP, splits, datasets."""

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import skip_unless_required
from PIL import Image

from sparseham.data import DATASETS, DataError, build_data, split_indices
from sparseham.data.files import find_fashion_mnist
from sparseham.data.loaders import TensorLoader, random_crop_flip

REPO = Path(__file__).resolve().parents[1]


def _batches(loader, epoch, start=0):
    return list(loader.epoch(epoch, start=start))


def _equal(a, b):
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def _synthetic(**kwargs):
    return build_data("synthetic", **{"batch_size": 64, "seed": 0, **kwargs})


# ---------------------------------------------------------------- order, resume, DDP, splits


def test_same_seed_and_epoch_give_identical_batches():
    first, again = _synthetic(), _synthetic()
    assert _equal(_batches(first.train, 3), _batches(again.train, 3))
    assert not torch.equal(_batches(first.train, 3)[0][1], _batches(first.train, 4)[0][1])
    assert not torch.equal(_batches(first.train, 3)[0][1],
                           _batches(_synthetic(seed=1).train, 3)[0][1])


def test_start_skips_batches_without_loading_them(monkeypatch):
    loader = _synthetic().train
    full = _batches(loader, 2)
    assert len(full) == len(loader) == 2048 // 64
    calls = []
    original = TensorLoader._load
    monkeypatch.setattr(TensorLoader, "_load", lambda s, *a: calls.append(a[2]) or original(s, *a))
    assert _equal(_batches(loader, 2, start=29), full[29:])
    assert calls == [29, 30, 31]
    with pytest.raises(DataError, match=r"start 33 is outside \[0, 32\]"):
        _batches(loader, 0, start=33)


def test_ddp_shards_are_disjoint_and_union_is_the_global_batch():
    single = _batches(_synthetic().train, 1)
    shards = [_batches(_synthetic(rank=r, world_size=4).train, 1) for r in range(4)]
    assert all(len(s) == len(single) for s in shards)
    for i, (x, y) in enumerate(single):
        assert all(s[i][0].shape[0] == 16 for s in shards)
        assert torch.equal(torch.cat([s[i][0] for s in shards]), x)
        assert torch.equal(torch.cat([s[i][1] for s in shards]), y)
    with pytest.raises(DataError, match=r"batch_size 30 is not divisible by world_size 4"):
        _synthetic(batch_size=30, rank=0, world_size=4)


def test_eval_loaders_keep_order_and_last_batch_and_are_not_sharded():
    data = _synthetic(eval_batch_size=100, rank=1, world_size=2, synthetic={"test_size": 250})
    batches = _batches(data.test, 0)
    assert len(data.test) == 3 and [len(y) for _, y in batches] == [100, 100, 50]
    assert len(data.train) == 32 and len(_batches(data.train, 0)[0][1]) == 32
    assert _equal(batches, _batches(_synthetic(batch_size=100,
                                               synthetic={"test_size": 250}).test, 7))
    assert torch.equal(torch.cat([y for _, y in batches]), data.test.y)


def test_val_split_is_disjoint_from_train_and_independent_of_seed():
    data, other = _synthetic(val_split=0.25), _synthetic(val_split=0.25, seed=9)
    train, val = data.train.indices, data.val.indices
    assert (data.info.train_size, data.info.val_size) == (1536, 512)
    assert len(set(train.tolist()) & set(val.tolist())) == 0
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(2048))
    assert torch.equal(val, other.val.indices)
    assert _equal(_batches(data.val, 0), _batches(other.val, 0))
    assert _synthetic().val is None and _synthetic().info.val_size == 0
    with pytest.raises(DataError, match=r"val_split 0\.0001 of 2048 samples leaves 0"):
        split_indices(2048, 0.0001)


def test_loaders_leave_the_global_rng_alone(cifar_root):
    state = torch.get_rng_state()
    _batches(build_data("cifar10", root=cifar_root, batch_size=8, seed=0).train, 0)
    _batches(_synthetic().train, 0)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset": "svhn"}, r"unknown dataset 'svhn'; choose one of " + ", ".join(DATASETS)),
        ({"batch_size": 0}, r"data\.batch_size = 0; expected an int >= 1"),
        ({"seed": 1.5}, r"data\.seed = 1\.5; expected an int"),
        ({"batch_size": 4096}, r"data\.batch_size 4096 exceeds the 2048 training samples"),
        ({"val_split": 1.0}, r"data\.val_split = 1\.0; expected a float in \[0, 1\)"),
        ({"rank": 2, "world_size": 2}, r"data\.rank = 2; expected an int in \[0, world_size=2\)"),
        ({"num_workers": -1}, r"data\.num_workers = -1; expected an int >= 0"),
        ({"eval_batch_size": 0}, r"data\.eval_batch_size = 0; expected an int >= 1"),
        ({"synthetic": {"nosie": 1.0}}, r"unknown data\.synthetic key 'nosie'; allowed keys"),
        ({"synthetic": {"classes": 1}}, r"data\.synthetic\.classes = 1; expected int >= 2"),
    ],
)
def test_bad_arguments_raise_data_error(kwargs, match):
    args = {"dataset": "synthetic", "batch_size": 64, "seed": 0, **kwargs}
    with pytest.raises(DataError, match=match):
        build_data(args.pop("dataset"), **args)


# ---------------------------------------------------------------------- synthetic task


def test_synthetic_task_is_fixed_and_learnable_by_a_linear_model():
    data = _synthetic()
    assert data.info == type(data.info)("synthetic", 10, 1, 16, 2048, 0, 512)
    assert torch.equal(data.test.x, _synthetic(seed=5).test.x)
    options = dataclasses.make_dataclass("Options", [("size", int), ("classes", int)])(8, 3)
    assert _synthetic(synthetic=options).info == type(data.info)("synthetic", 3, 1, 8, 2048, 0, 512)
    assert torch.bincount(data.train.y).tolist() == [205] * 8 + [204] * 2
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    stream = (batch for epoch in range(4) for batch in data.train.epoch(epoch))
    for _ in range(100):
        x, y = next(stream)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in data.test.epoch(0))
    assert correct / 512 > 0.6


# ------------------------------------------------------------------ Fashion-MNIST


@pytest.fixture(scope="module")
def fashion():
    if find_fashion_mnist(REPO / "data") is None:
        skip_unless_required("Fashion-MNIST idx files absent: run 'make data' (apt dataset-fashion-mnist)",
                             "SPARSEHAM_REQUIRE_DATA")
    return build_data("fashion_mnist", root=str(REPO / "data"), batch_size=1000, seed=0)


def test_real_fashion_mnist_loads_with_standard_statistics(fashion):
    expected = type(fashion.info)("fashion_mnist", 10, 1, 28, 60000, 0, 10000)
    assert dataclasses.replace(fashion.info, source="") == expected
    assert torch.bincount(fashion.train.y).tolist() == [6000] * 10
    assert torch.bincount(fashion.test.y).tolist() == [1000] * 10
    pixels = fashion.train.x.float() / 255
    assert pixels.mean().item() == pytest.approx(0.2860, abs=1e-3)
    assert pixels.std().item() == pytest.approx(0.3530, abs=1e-3)
    x, y = _batches(fashion.train, 0, start=59)[0]
    assert x.shape == (1000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 0.05 and x.std().item() == pytest.approx(1.0, abs=0.05)


# --------------------------------------------------------------- CIFAR and image folders


def _write_cifar_batch(path, n, key, classes, seed):
    rng = np.random.default_rng(seed)
    entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             key: [int(v) for v in rng.integers(0, classes, n)]}
    path.write_bytes(pickle.dumps(entry, protocol=2))


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """A CIFAR-10 (5 x 8 train, 12 test) and CIFAR-100 (24, 12) in torchvision's layout."""
    root = tmp_path_factory.mktemp("cifar")
    (root / "cifar-10-batches-py").mkdir()
    (root / "cifar-100-python").mkdir()
    for i in range(1, 6):
        _write_cifar_batch(root / "cifar-10-batches-py" / f"data_batch_{i}", 8, "labels", 10, i)
    _write_cifar_batch(root / "cifar-10-batches-py" / "test_batch", 12, "labels", 10, 0)
    _write_cifar_batch(root / "cifar-100-python" / "train", 24, "fine_labels", 100, 6)
    _write_cifar_batch(root / "cifar-100-python" / "test", 12, "fine_labels", 100, 7)
    return root


def test_cifar_stand_in_loads_with_deterministic_augmentation(cifar_root):
    data = build_data("cifar10", root=str(cifar_root), batch_size=8, seed=0)
    assert dataclasses.replace(data.info, source="") == type(data.info)("cifar10", 10, 3, 32, 40, 0, 12)
    assert _equal(_batches(data.train, 1), _batches(data.train, 1))
    assert _equal(_batches(data.train, 1, start=3), _batches(data.train, 1)[3:])
    assert not _equal(_batches(data.train, 1), _batches(data.train, 2))
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    x, y = _batches(data.train, 1)[0]
    rows = data.train.indices[torch.randperm(40, generator=torch.Generator().manual_seed(1))[:8]]
    plain = (data.train.x[rows].float() / 255 - mean) / std
    assert torch.equal(y, data.train.y[rows]) and not torch.allclose(x, plain)
    x_test, _ = _batches(data.test, 0)[0]
    assert torch.allclose(x_test, (data.test.x[:8].float() / 255 - mean) / std, atol=1e-5)
    # Augmentation is drawn for the global batch, so DDP shards still add up to it.
    shards = [build_data("cifar10", root=str(cifar_root), batch_size=8, seed=0, rank=r,
                         world_size=2).train for r in range(2)]
    assert torch.equal(torch.cat([_batches(s, 1)[0][0] for s in shards]), x)
    # The config always carries data.synthetic; other datasets ignore it.
    cifar100 = build_data("cifar100", root=str(cifar_root), batch_size=8, seed=0,
                          synthetic={"noise": 1.0})
    assert dataclasses.replace(cifar100.info, source="") == type(data.info)("cifar100", 100, 3, 32, 24, 0, 12)


def test_random_crop_flip_matches_the_definition():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).view(2, 3, 6, 6)
    same = random_crop_flip(x, torch.tensor([[2, 2], [2, 2]]), torch.tensor([False, True]), 2)
    assert torch.equal(same[0], x[0]) and torch.equal(same[1], x[1].flip(2))
    shifted = random_crop_flip(x, torch.tensor([[0, 4], [4, 0]]), torch.tensor([False] * 2), 2)
    assert torch.equal(shifted[0, :, 2:, :4], x[0, :, :4, 2:]) and shifted[0, :, :2].sum() == 0
    assert torch.equal(shifted[1, :, :4, 2:], x[1, :, 2:, :4]) and shifted[1, :, :, :2].sum() == 0


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 3), ("val", 2)):
        for cls in ("n01", "n02"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


def test_image_folder_loads_deterministically(folder_root):
    data = build_data("imagenet", root=str(folder_root), batch_size=2, seed=0)
    assert data.info == type(data.info)("imagenet", 2, 3, 224, 6, 0, 4, source=str(folder_root))
    state = torch.get_rng_state()
    epoch = _batches(data.train, 0)
    assert torch.equal(state, torch.get_rng_state())
    assert [tuple(x.shape) for x, _ in epoch] == [(2, 3, 224, 224)] * 3
    assert _equal(epoch, _batches(data.train, 0))
    assert _equal(epoch[1:], _batches(data.train, 0, start=1))
    assert not _equal(epoch, _batches(data.train, 1))
    workers = build_data("imagenet", root=str(folder_root), batch_size=2, seed=0, num_workers=1)
    assert _equal(epoch, _batches(workers.train, 0))
    assert [y.tolist() for _, y in _batches(data.test, 0)] == [[0, 0], [1, 1]]
    held_out = build_data("imagenet", root=str(folder_root), batch_size=2, seed=0, val_split=0.5)
    assert (held_out.info.train_size, held_out.info.val_size, len(held_out.val)) == (3, 3, 2)
    assert _equal(_batches(held_out.val, 0), _batches(held_out.val, 5))


def test_image_folder_errors(tmp_path, folder_root):
    (tmp_path / "train").symlink_to(folder_root / "train")
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match=r"imagenet: .*val holds no class folders with images"):
        build_data("imagenet", root=str(tmp_path), batch_size=2, seed=0)
    (tmp_path / "val" / "n01").symlink_to(folder_root / "val" / "n01")
    with pytest.raises(DataError, match=r"train has 2 classes but .*val has 1 \(or other names"):
        build_data("imagenet", root=str(tmp_path), batch_size=2, seed=0)
