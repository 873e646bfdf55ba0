"""Deterministic, resumable batch loaders.

A loader's batches are a pure function of ``(seed, epoch)``: the sample order comes from a
``torch.Generator`` seeded with :func:`derive_seed`, and augmentation draws from generators
seeded per batch (in memory) or per sample (image folders). No loader touches torch's global
RNG, so iterating data never changes the random stream of the training loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sparseham.data.files import DataError

__all__ = ["BatchLoader", "FolderLoader", "TensorLoader", "derive_seed", "random_crop_flip"]

_MIX = 1_000_003


def derive_seed(*parts: int) -> int:
    """Mixes integers into one 63-bit seed; the same in every process (no ``hash()``).

    ``derive_seed(seed, epoch) == seed * 1_000_003 + epoch`` for small non-negative values.
    """
    out = 0
    for part in parts:
        out = (out * _MIX + int(part)) % (1 << 63)
    return out


def random_crop_flip(x: Tensor, shifts: Tensor, flips: Tensor, pad: int) -> Tensor:
    """Zero-pads a batch by ``pad``, crops it back to its size and mirrors some images.

    The vectorized form of torchvision's ``RandomCrop(size, padding=pad)`` followed by
    ``RandomHorizontalFlip()``.

    Args:
        x: Images, NCHW.
        shifts: Crop offsets, int64 of shape (N, 2) with values in ``[0, 2 * pad]`` (row, col).
        flips: Bool of shape (N,); True mirrors the image left to right.
        pad: Padding on each side.

    Returns:
        The augmented batch, same shape and dtype as ``x``.
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = shifts[:, 0, None] + torch.arange(h)
    cols = shifts[:, 1, None] + torch.arange(w)
    # Reading the crop's columns backwards is the flip, so no second pass over the batch.
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    # Advanced indices split by a slice move to the front: the result is (N, H, W, C).
    out = padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


class BatchLoader:
    """Batches of one split, in an order fixed by ``(seed, epoch)``.

    Training loaders shuffle, drop the last partial batch and, under DDP, give rank ``r`` the
    ``r``-th of ``world_size`` equal slices of each global batch. Evaluation loaders keep the
    file order and the last partial batch, and are not sharded: every rank sees all of it.

    Args:
        num_samples: Samples in the split.
        batch_size: The global batch size (summed over ranks).
        seed: The experiment seed.
        train: Shuffle, drop the last partial batch and shard.
        rank: This process's rank.
        world_size: Number of processes.
    """

    def __init__(self, num_samples: int, *, batch_size: int, seed: int, train: bool,
                 rank: int = 0, world_size: int = 1) -> None:
        if train and batch_size % world_size:
            raise DataError(f"batch_size {batch_size} is not divisible by world_size "
                            f"{world_size}; set data.batch_size to a multiple of {world_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.train = train
        # Evaluation loaders are not sharded: each rank sees the whole split.
        self.rank = rank if train else 0
        self.world_size = world_size if train else 1

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.train:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yields the batches of one epoch.

        Args:
            epoch: The epoch; with the seed it fixes the order and the augmentation.
            start: Skip this many batches without loading them (to resume mid-epoch).

        Yields:
            ``(x, y)``: float32 NCHW normalized images and int64 labels, on the CPU.
        """
        for index, batch in self._global_batches(epoch, start):
            yield self._load(batch, epoch, index)

    def _global_batches(self, epoch: int, start: int) -> Iterator[tuple[int, Tensor]]:
        if not 0 <= start <= len(self):
            raise DataError(f"start {start} is outside [0, {len(self)}], the batches per "
                            "epoch; the checkpoint does not belong to this data config")
        if self.train:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        for index in range(start, len(self)):
            yield index, order[index * self.batch_size:(index + 1) * self.batch_size]

    def _shard(self, size: int) -> slice:
        per_rank = size // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def _load(self, batch: Tensor, epoch: int, index: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class TensorLoader(BatchLoader):
    """A :class:`BatchLoader` over tensors held in memory.

    Args:
        x: All images of the source, NCHW; uint8 pixels are scaled by 1/255 first.
        y: All labels, int64.
        indices: The rows of ``x`` that form this split.
        mean: Per-channel mean subtracted after scaling.
        std: Per-channel std divided by after subtracting the mean.
        augment: Random crop with ``pad`` zero padding and horizontal flip, drawn for the
            whole global batch from a generator seeded with ``(seed, epoch, batch index)``.
        pad: Padding of the random crop.
        **kwargs: ``batch_size``, ``seed``, ``train``, ``rank``, ``world_size`` of
            :class:`BatchLoader`.
    """

    def __init__(self, x: Tensor, y: Tensor, indices: Tensor, *, mean: Sequence[float],
                 std: Sequence[float], augment: bool = False, pad: int = 4, **kwargs) -> None:
        super().__init__(len(indices), **kwargs)
        self.x, self.y, self.indices = x, y, indices
        self.augment, self.pad = augment, pad
        scale = 1 / 255 if x.dtype == torch.uint8 else 1.0
        std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        # x * a + b in one pass equals (x * scale - mean) / std.
        self._a = scale / std_t
        self._b = -torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) / std_t

    def _load(self, batch: Tensor, epoch: int, index: int) -> tuple[Tensor, Tensor]:
        part = self._shard(len(batch))
        rows = self.indices[batch]
        x = self.x[rows[part]]
        if self.augment:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, index))
            shifts = torch.randint(0, 2 * self.pad + 1, (len(batch), 2), generator=generator)
            flips = torch.rand(len(batch), generator=generator) < 0.5
            x = random_crop_flip(x, shifts[part], flips[part], self.pad)
        return torch.addcmul(self._b, x.float(), self._a), self.y[rows[part]]


class _SeededImages(Dataset):
    """Reads ``(index, seed)`` keys so that each sample's augmentation has its own seed."""

    def __init__(self, samples: Sequence[tuple[str, int]], loader: Callable, transform: Callable):
        self.samples, self.loader, self.transform = samples, loader, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        index, seed = key
        path, label = self.samples[index]
        image = self.loader(path)
        # torchvision transforms draw from the global RNG; fork it so the seed is local.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), label


class FolderLoader(BatchLoader):
    """A :class:`BatchLoader` that decodes image files with a torch ``DataLoader``.

    The sample order is the same pure function of ``(seed, epoch)`` as in memory. Each
    sample is transformed under a seed derived from ``(seed, epoch, sample index)``, so
    augmentation does not depend on workers, ranks or ``start``. Worker processes are
    seeded from ``(seed, epoch, start)``. Resumed epochs are bit-identical only as far as
    image decoding is (same Pillow build); in-memory datasets are always bit-identical.

    Args:
        samples: ``(path, label)`` pairs, as ``ImageFolder.samples``.
        loader: Opens a path as a PIL image.
        transform: PIL image to normalized float tensor.
        indices: The samples that form this split.
        num_workers: ``DataLoader`` worker processes; 0 decodes in this process.
        **kwargs: ``batch_size``, ``seed``, ``train``, ``rank``, ``world_size`` of
            :class:`BatchLoader`.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], loader: Callable,
                 transform: Callable, indices: Tensor, *, num_workers: int = 0,
                 **kwargs) -> None:
        super().__init__(len(indices), **kwargs)
        self.dataset = _SeededImages(samples, loader, transform)
        self.indices, self.num_workers = indices, num_workers

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yields the batches of one epoch; see :meth:`BatchLoader.epoch`."""
        keys = []
        for _, batch in self._global_batches(epoch, start):
            rows = self.indices[batch[self._shard(len(batch))]].tolist()
            keys.append([(row, derive_seed(self.seed, epoch, row)) for row in rows])
        # An explicit generator keeps DataLoader from drawing its base seed from global RNG.
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, start))
        yield from DataLoader(self.dataset, batch_sampler=keys, num_workers=self.num_workers,
                              generator=generator)
