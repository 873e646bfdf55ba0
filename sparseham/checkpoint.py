"""Checkpoints that survive a kill at any moment.

Each checkpoint is written to a temporary file, flushed and fsynced, then renamed to
``checkpoint-<step>.pt`` (``os.replace`` is atomic), and ``checkpoint.pt`` is atomically re-pointed
at it as a hard link. So ``RUN/checkpoint.pt`` is always a complete checkpoint, and
``torch.load(RUN/checkpoint.pt)["model"]`` is the model's state_dict. The newest ``keep`` are kept.

Each file carries a SHA-256 over its tensors and values (``torch.load`` checks the zip structure,
not the data), so a truncated or corrupted file is detected on load and resuming falls back to the
newest good one.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "latest_good_checkpoint", "candidates"]

LATEST = "checkpoint.pt"
_NUMBERED = re.compile(r"checkpoint-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says which file and why."""


def _feed(h, value: Any) -> None:
    """Hash a nested checkpoint value in a fixed order: tensors by dtype, shape and bytes."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)  # 0-d tensors cannot be viewed as bytes
        h.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(b"{")
        for key in value:
            h.update(repr(key).encode())
            _feed(h, value[key])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for item in value:
            _feed(h, item)
        h.update(b"]")
    else:
        h.update(repr(value).encode())


def _digest(state: dict[str, Any]) -> str:
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "sha256"})
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], run_dir: str | os.PathLike, *, keep: int = 2) -> Path:
    """Atomically write ``state`` (which must hold ``"step"``) and re-point ``checkpoint.pt`` at it."""
    run_dir = Path(run_dir)
    numbered = run_dir / f"checkpoint-{int(state['step'])}.pt"
    tmp, link = run_dir / ".checkpoint.tmp", run_dir / ".checkpoint.link"
    try:
        with open(tmp, "wb") as f:
            torch.save({**state, "sha256": _digest(state)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, numbered)
        link.unlink(missing_ok=True)
        os.link(numbered, link)
        os.replace(link, run_dir / LATEST)
        _fsync_dir(run_dir)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"cannot write a checkpoint in {run_dir}: {e.strerror or e}; the previous checkpoint is intact"
        ) from None
    for old in _numbered(run_dir)[keep:]:
        old.unlink(missing_ok=True)
    return run_dir / LATEST


def _numbered(run_dir: Path) -> list[Path]:
    """``checkpoint-<step>.pt`` files, newest first."""
    found = [(int(m.group(1)), p) for p in run_dir.glob("checkpoint-*.pt") if (m := _NUMBERED.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip or pickle damage: a truncated or overwritten file
        raise CheckpointError(f"{path} is truncated or corrupted ({type(e).__name__})") from None
    if not isinstance(state, dict) or not {"model", "step", "sha256"} <= set(state):
        raise CheckpointError(f"{path} is not a sparseham checkpoint (no model, step or checksum)")
    if state["sha256"] != _digest(state):
        raise CheckpointError(f"{path} is corrupted (checksum mismatch)")
    return state


def candidates(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint files in ``run_dir``, newest first (``checkpoint.pt`` leads when present)."""
    run_dir = Path(run_dir)
    latest = run_dir / LATEST
    first = [latest] if latest.exists() else []
    return first + [p for p in _numbered(run_dir) if not (first and os.path.samefile(p, latest))]


def latest_good_checkpoint(
    run_dir: str | os.PathLike, map_location: Any = "cpu"
) -> tuple[Path, dict[str, Any], list[str]]:
    """The newest checkpoint that loads, and the problems of the newer ones it skipped.

    Raises:
        CheckpointError: when no checkpoint exists or none is readable.
    """
    problems = []
    for path in candidates(run_dir):
        try:
            return path, load_checkpoint(path, map_location), problems
        except CheckpointError as e:
            problems.append(str(e))
    if problems:
        raise CheckpointError("no readable checkpoint: " + "; ".join(problems))
    raise CheckpointError(f"no checkpoint in {run_dir}")
