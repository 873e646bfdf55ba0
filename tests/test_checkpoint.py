"""sparseham.train.checkpoint: atomic writes, checksums, falling back past damaged files, keep-K, errors."""

import errno
import os
import random
import re
import shutil
import struct
import zipfile

import pytest
import torch

from sparseham.train import checkpoint as ckpt
from sparseham.train.checkpoint import (
    CheckpointError,
    latest_good_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "step": step,
        "model": {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)},
        "optimizer": {"state": {0: {"momentum_buffer": torch.randn(64, 32, generator=g)}}},
        "skipped": 0,
    }


def numbered(run_dir) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in run_dir.glob("checkpoint-*.pt"))


def flip_payload_byte(path, offset: int = 100) -> None:
    """Flip one byte inside the largest tensor record, leaving the zip structure intact."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + offset] ^= 0xFF
    path.write_bytes(raw)  # same inode: checkpoint.pt, a hard link to it, is damaged too


def test_round_trip_and_checkpoint_pt_links_the_newest(tmp_path):
    save_checkpoint(state(1), tmp_path)
    save_checkpoint(state(2), tmp_path)
    loaded = load_checkpoint(tmp_path / "checkpoint.pt")
    assert loaded["step"] == 2 and torch.equal(loaded["model"]["w"], state(2)["model"]["w"])
    assert os.path.samefile(tmp_path / "checkpoint.pt", tmp_path / "checkpoint-2.pt")
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"].keys() == {"w", "b"}
    assert not (tmp_path / ".checkpoint.tmp").exists() and not (tmp_path / ".checkpoint.link").exists()


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keeps_the_newest_k(tmp_path, keep):
    for step in (5, 10, 15, 20, 25):
        save_checkpoint(state(step), tmp_path, keep=keep)
    assert numbered(tmp_path) == [5, 10, 15, 20, 25][-keep:]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 25


@pytest.mark.parametrize("keep_bytes", [0, 22, 0.5, -1])
def test_truncated_file_is_a_clear_error(tmp_path, keep_bytes):
    save_checkpoint(state(3), tmp_path)
    path = tmp_path / "checkpoint-3.pt"
    raw = path.read_bytes()
    cut = int(len(raw) * keep_bytes) if isinstance(keep_bytes, float) else keep_bytes % len(raw)
    path.write_bytes(raw[:cut])
    with pytest.raises(CheckpointError, match=re.escape(f"{path} is truncated or corrupted (")):
        load_checkpoint(path)


@pytest.mark.parametrize("offset", [0, 100, 4000])
def test_flipped_tensor_bytes_fail_the_checksum(tmp_path, offset):
    save_checkpoint(state(3), tmp_path)
    flip_payload_byte(tmp_path / "checkpoint-3.pt", offset)
    with pytest.raises(
        CheckpointError, match=re.escape(f"{tmp_path / 'checkpoint.pt'} is corrupted (checksum")
    ):
        load_checkpoint(tmp_path / "checkpoint.pt")


def test_foreign_and_missing_files(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt is not a sparseham checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint not found: {tmp_path / 'nope.pt'}")):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"no checkpoint in {tmp_path}")):
        latest_good_checkpoint(tmp_path)


def test_falls_back_past_damaged_files_and_names_them(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(state(step), tmp_path, keep=3)
    (tmp_path / "checkpoint-30.pt").write_bytes((tmp_path / "checkpoint-30.pt").read_bytes()[:500])
    flip_payload_byte(tmp_path / "checkpoint-20.pt")
    path, loaded, problems = latest_good_checkpoint(tmp_path)
    assert path == tmp_path / "checkpoint-10.pt" and loaded["step"] == 10
    assert problems == [
        f"{tmp_path / 'checkpoint.pt'} is truncated or corrupted (RuntimeError)",
        f"{tmp_path / 'checkpoint-20.pt'} is corrupted (checksum mismatch)",
    ]


def test_all_damaged_says_how_to_start_over(tmp_path):
    save_checkpoint(state(1), tmp_path)
    flip_payload_byte(tmp_path / "checkpoint-1.pt")
    fix = "delete the damaged files or choose another --out to start over"
    with pytest.raises(CheckpointError, match=rf"^no readable checkpoint in .*checksum mismatch\); {fix}$"):
        latest_good_checkpoint(tmp_path)


def test_kill_between_rename_and_relink_prefers_the_newer_file(tmp_path):
    """A numbered file newer than checkpoint.pt (killed before re-pointing) is complete: use it."""
    save_checkpoint(state(1), tmp_path, keep=3)
    save_checkpoint(state(2), tmp_path, keep=3)
    (tmp_path / "checkpoint.pt").unlink()
    os.link(tmp_path / "checkpoint-1.pt", tmp_path / "checkpoint.pt")
    (tmp_path / ".checkpoint.tmp").write_bytes(b"PK\x03\x04half a checkpoint")  # a later, torn write
    assert ckpt.candidates(tmp_path) == [tmp_path / "checkpoint-2.pt", tmp_path / "checkpoint.pt"]
    path, loaded, problems = latest_good_checkpoint(tmp_path)
    assert (path.name, loaded["step"], problems) == ("checkpoint-2.pt", 2, [])
    save_checkpoint(state(3), tmp_path, keep=3)  # the stale temp file is simply overwritten
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3
    assert not (tmp_path / ".checkpoint.tmp").exists()


def test_copied_in_checkpoint_pt_without_numbered_twin_leads(tmp_path):
    save_checkpoint(state(4), tmp_path)
    shutil.copy(tmp_path / "checkpoint-4.pt", tmp_path / "copy")
    (tmp_path / "checkpoint.pt").unlink()
    os.replace(tmp_path / "copy", tmp_path / "checkpoint.pt")
    assert ckpt.candidates(tmp_path) == [tmp_path / "checkpoint.pt", tmp_path / "checkpoint-4.pt"]


class _FailingFile:
    """Stands in for the temp file: writes fail after ``limit`` bytes, like a full disk."""

    def __init__(self, path, code: int, limit: int) -> None:
        self.file, self.code, self.left = open(path, "wb"), code, limit

    def write(self, data) -> int:
        if len(data) > self.left:
            raise OSError(self.code, os.strerror(self.code))
        self.left -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EROFS])
@pytest.mark.parametrize("limit", [0, 3000])
def test_write_failure_is_one_clear_line_and_keeps_the_previous(tmp_path, monkeypatch, code, limit):
    save_checkpoint(state(1), tmp_path)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(ckpt, "open", lambda path, mode: _FailingFile(path, code, limit), raising=False)
    msg = (
        f"cannot write checkpoint-2.pt in {tmp_path}: {os.strerror(code)}; the previous checkpoint is "
        "intact; free disk space or make the directory writable, then re-run the same command"
    )
    with pytest.raises(CheckpointError, match="^" + re.escape(msg) + "$"):
        save_checkpoint(state(2), tmp_path)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 1
    assert numbered(tmp_path) == [1] and not (tmp_path / ".checkpoint.tmp").exists()


def test_fsync_failure_is_reported_too(tmp_path, monkeypatch):
    save_checkpoint(state(1), tmp_path)

    def fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    with pytest.raises(CheckpointError, match="Input/output error; the previous checkpoint is intact"):
        save_checkpoint(state(2), tmp_path)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 1


def test_rng_state_round_trip():
    saved = ckpt.rng_state()
    a = (torch.rand(3), random.random())
    ckpt.set_rng_state(saved)
    assert torch.equal(torch.rand(3), a[0]) and random.random() == a[1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_state_round_trips_through_a_checkpoint(tmp_path):
    from sparseham.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state

    torch.cuda.manual_seed_all(5)
    torch.rand(7, device="cuda")  # advance it: a fresh state would pass by accident
    save_checkpoint({"step": 0, "rng": rng_state()}, tmp_path)
    want = torch.rand(4, device="cuda")
    torch.rand(9, device="cuda")
    set_rng_state(load_checkpoint(tmp_path / "checkpoint.pt")["rng"])
    assert torch.equal(torch.rand(4, device="cuda"), want)
