"""Tests for sparseham.data.files: idx and pickle parsing, validation and error messages."""

import gzip
import io
import os
import pickle
import re

import numpy as np
import pytest
import torch

from sparseham.data import DataError, build_data
from sparseham.data import files as data_files
from sparseham.data.files import find_fashion_mnist, load_mnist, read_idx, restricted_load


def _write_idx(path, array, magic=None):
    magic = magic if magic is not None else 0x800 + array.ndim
    raw = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


@pytest.fixture
def fashion_root(tmp_path, monkeypatch):
    """A tiny Fashion-MNIST in root/fashion_mnist/, with the Debian folder hidden."""
    monkeypatch.setattr(data_files, "FASHION_SYSTEM_DIR", tmp_path / "absent")
    folder = tmp_path / "fashion_mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 10)):
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_tiny_fashion_files_load(fashion_root):
    data = build_data("fashion_mnist", root=str(fashion_root), batch_size=5, seed=0)
    assert (data.info.train_size, data.info.test_size, len(data.train)) == (20, 10, 4)
    x, y = next(data.test.epoch(0))
    raw = read_idx(fashion_root / "fashion_mnist" / "t10k-images-idx3-ubyte.gz", 3)[:5]
    expected = (torch.from_numpy(raw.copy()).float().unsqueeze(1) / 255 - 0.2860) / 0.3530
    assert torch.allclose(x, expected, atol=1e-6) and y.tolist() == [0, 1, 2, 3, 4]


def test_torchvision_raw_layout_is_found(fashion_root):
    raw = fashion_root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for path in (fashion_root / "fashion_mnist").iterdir():
        (raw / path.stem).write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    assert find_fashion_mnist(fashion_root)["y_test"] == raw / "t10k-labels-idx1-ubyte"
    data = build_data("fashion_mnist", root=str(fashion_root), batch_size=5, seed=0)
    assert data.test.y.tolist() == list(range(10))


def _corrupt_magic(folder):
    return _write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((20, 28, 28)), 0x0801)


def _truncate_gzip(folder):
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-500])
    return path


def _truncate_payload(folder):
    path = folder / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
    return path


def _drop_a_label(folder):
    return _write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(19) % 10)


def _bad_label(folder):
    return _write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.array([0] * 7 + [12, 0, 0]))


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (_corrupt_magic, r"magic number 0x00000801, expected 0x00000803"),
        (_truncate_gzip, r"unreadable or truncated"),
        (_truncate_payload, r"7756 bytes, expected 7856 for shape \[10, 28, 28\]"),
        (_drop_a_label, r"holds 20 images but .*train-labels-idx1-ubyte\.gz holds 19 labels"),
        (_bad_label, r"label 12 at index 7 is outside \[0, 10\)"),
    ],
)
def test_corrupt_idx_files_raise_data_error_naming_the_file(fashion_root, corrupt, match):
    path = corrupt(fashion_root / "fashion_mnist")
    if "labels" not in match:
        match = re.escape(str(path)) + ".*" + match
    with pytest.raises(DataError, match=match):
        build_data("fashion_mnist", root=str(fashion_root), batch_size=5, seed=0)


def test_corrupt_system_file_says_reinstall(tmp_path, monkeypatch):
    monkeypatch.setattr(data_files, "FASHION_SYSTEM_DIR", tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x08")
    with pytest.raises(DataError, match=re.escape(f"{path}: 3 bytes is shorter than the idx "
                                                  "header (8 bytes); reinstall with 'apt-get "
                                                  "install --reinstall dataset-fashion-mnist'")):
        read_idx(path, 1)


@pytest.mark.parametrize(
    ("dataset", "match"),
    [
        ("fashion_mnist", r"Fashion-MNIST not found .*apt-get install dataset-fashion-mnist"),
        ("mnist", r"MNIST not found at .*mnist\.npz; run 'sparseham fetch mnist --root "),
        ("cifar10", r"cifar10 not found: .*data_batch_1 is missing; set data\.download: true"),
        ("cifar100", r"cifar100 not found: .*cifar-100-python/train is missing; .*extract "
                     r"cifar-100-python\.tar\.gz"),
        ("imagenet", r"imagenet not found: .*train is not a directory; place ImageNet's"),
    ],
)
def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch, dataset, match):
    monkeypatch.setattr(data_files, "FASHION_SYSTEM_DIR", tmp_path / "absent")
    with pytest.raises(DataError, match=match):
        build_data(dataset, root=str(tmp_path), batch_size=8, seed=0)


class _Exploit:
    def __reduce__(self):
        return os.system, ("echo pwned",)


def test_restricted_unpickler_refuses_code_and_admits_arrays():
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle global '\w+\.system'"):
        restricted_load(io.BytesIO(pickle.dumps({"data": _Exploit()}, protocol=2)))
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for protocol in (2, 5):
        loaded = restricted_load(io.BytesIO(pickle.dumps({"a": array}, protocol=protocol)))
        assert np.array_equal(loaded["a"], array) and loaded["a"].dtype == np.uint8


def test_restricted_unpickler_admits_latin1_encode_only():
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(text, "latin1").
    assert b"_codecs" in pickle.dumps(b"\xff\x00a", protocol=2)
    assert restricted_load(io.BytesIO(pickle.dumps(b"\xff\x00a", protocol=2))) == b"\xff\x00a"
    payload = b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00hiX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(pickle.UnpicklingError, match=r"refusing _codecs.encode with encoding 'r"):
        restricted_load(io.BytesIO(payload))


def _write_cifar_batch(path, labels, data=None):
    data = np.zeros((len(labels), 3072), dtype=np.uint8) if data is None else data
    path.write_bytes(pickle.dumps({"data": data, "labels": labels}, protocol=2))


def test_cifar_label_out_of_range_shape_and_foreign_pickle(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    path = folder / "data_batch_1"
    _write_cifar_batch(path, [0, 3, 10, 1])
    with pytest.raises(DataError, match=re.escape(f"{path}: label 10 at index 2 is outside [0, 1")):
        build_data("cifar10", root=str(tmp_path), batch_size=2, seed=0)
    _write_cifar_batch(path, [0, 1], np.zeros((2, 1024), dtype=np.uint8))
    with pytest.raises(DataError, match=r"data_batch_1: data uint8 \(2, 1024\) with 2 labels, "
                                        r"expected uint8 \(N, 3072\)"):
        build_data("cifar10", root=str(tmp_path), batch_size=2, seed=0)
    path.write_bytes(pickle.dumps({"data": _Exploit()}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_1: not a CIFAR batch file .*refusing"):
        build_data("cifar10", root=str(tmp_path), batch_size=2, seed=0)


def test_malformed_mnist_cache_raises_data_error(tmp_path):
    (tmp_path / "mnist").mkdir()
    path = tmp_path / "mnist" / "mnist.npz"
    x = np.zeros((4, 28, 28), dtype=np.float32)
    np.savez(path, x_train=x, y_train=np.zeros(4), x_test=x, y_test=np.zeros(4))
    with pytest.raises(DataError, match=re.escape(f"{path}: x_train float32 (4, 28, 28) with 4 "
                                                  "labels, expected uint8 (N, 28, 28)")):
        load_mnist(tmp_path)
    path.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(DataError, match=r"mnist\.npz: unreadable .*delete it and run 'sparseham fetch "):
        load_mnist(tmp_path)


@pytest.mark.parametrize(("labels", "shown"), [
    (np.zeros((4, 1), dtype=np.int64), r"int64 \(4, 1\)"),
    (np.array([0.0, 1.7, 2.2, 3.9]), r"float64 \(4,\)"),  # would be truncated silently
])
def test_mnist_labels_must_be_integers_of_shape_n(tmp_path, labels, shown):
    (tmp_path / "mnist").mkdir()
    x = np.zeros((4, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "mnist" / "mnist.npz", x_train=x, y_train=labels, x_test=x,
             y_test=np.zeros(4, np.int64))
    with pytest.raises(DataError, match=rf"mnist\.npz: labels of {shown}, expected integers of shape \(N,\)"):
        load_mnist(tmp_path)


def test_a_copy_under_the_root_wins_over_the_system_copy_and_is_named(fashion_root, monkeypatch):
    system = fashion_root / "system"
    system.mkdir()
    for path in (fashion_root / "fashion_mnist").iterdir():  # a second, different copy
        (system / path.name).write_bytes(path.read_bytes())
    _write_idx(system / "t10k-labels-idx1-ubyte.gz", np.full(10, 9))
    monkeypatch.setattr(data_files, "FASHION_SYSTEM_DIR", system)
    data = build_data("fashion_mnist", root=str(fashion_root), batch_size=5, seed=0)
    assert data.test.y.tolist() == list(range(10)) and data.info.source == str(fashion_root / "fashion_mnist")
    (fashion_root / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz").unlink()  # incomplete: the system copy
    data = build_data("fashion_mnist", root=str(fashion_root), batch_size=5, seed=0)
    assert data.test.y.tolist() == [9] * 10 and data.info.source == str(system)
