"""Checkpoints that survive a kill at any moment.

``RUN/checkpoint.pt`` is always the newest complete checkpoint (``torch.load(...)["model"]`` is the
model's state_dict). A new one is written to a temporary file, flushed and fsynced, and only then
renamed over ``checkpoint.pt`` (``os.replace`` is atomic). The previous one is first hard-linked
to ``checkpoint-<step>.pt``; the newest ``keep`` are kept. Every file carries a SHA-256 of its
payload, so a truncated or corrupted file is detected on load, and resuming falls back to the
newest good one.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "latest_good_checkpoint", "candidates"]

LATEST = "checkpoint.pt"
_OLD = re.compile(r"checkpoint-(\d+)\.pt$")
_MAGIC = b"SPARSEHAM-CKPT-1\n"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says which file and why."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], run_dir: str | os.PathLike, *, keep: int = 2) -> Path:
    """Atomically write ``state`` as ``run_dir/checkpoint.pt``, keeping the newest ``keep`` files."""
    run_dir = Path(run_dir)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    latest, tmp = run_dir / LATEST, run_dir / f".{LATEST}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(_MAGIC + digest + b" %d\n" % int(state["step"]))
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if latest.exists():
            old_step = _step_of(latest)
            if old_step is not None:
                older = run_dir / f"checkpoint-{old_step}.pt"
                older.unlink(missing_ok=True)
                os.link(latest, older)
        os.replace(tmp, latest)
        _fsync_dir(run_dir)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"cannot write a checkpoint in {run_dir}: {e.strerror or e}; the previous checkpoint is intact"
        ) from None
    _prune(run_dir, keep)
    return latest


def _step_of(path: Path) -> int | None:
    """The step recorded in a checkpoint's header, without reading its payload."""
    with open(path, "rb") as f:
        head = f.read(len(_MAGIC) + 100)
    fields = head[len(_MAGIC) :].split(b"\n", 1)[0].split(b" ")
    ok = head.startswith(_MAGIC) and len(fields) == 2 and fields[1].isdigit()
    return int(fields[1]) if ok else None


def _prune(run_dir: Path, keep: int) -> None:
    olds = sorted((int(m.group(1)), p) for p in run_dir.iterdir() if (m := _OLD.match(p.name)))
    for _, path in olds[: max(0, len(olds) - (keep - 1))]:
        path.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    head, _, rest = raw.partition(b"\n")
    line, _, payload = rest.partition(b"\n")
    digest = line.split(b" ")[0]
    if head + b"\n" != _MAGIC or len(digest) != 64:
        raise CheckpointError(f"{path} is not a sparseham checkpoint (or its header is damaged)")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(f"{path} is corrupted or truncated (checksum mismatch)")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:  # the payload passed its checksum, so this is a version problem
        raise CheckpointError(f"{path} cannot be loaded: {e}") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path} lacks the model or step entries")
    return state


def candidates(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint files in ``run_dir``, newest first."""
    run_dir = Path(run_dir)
    olds = sorted(
        ((int(m.group(1)), p) for p in run_dir.glob("checkpoint-*.pt") if (m := _OLD.match(p.name))),
        reverse=True,
    )
    latest = [run_dir / LATEST] if (run_dir / LATEST).exists() else []
    return latest + [p for _, p in olds]


def latest_good_checkpoint(
    run_dir: str | os.PathLike, map_location: Any = "cpu"
) -> tuple[Path, dict, list[str]]:
    """The newest checkpoint that loads, and the problems of the newer ones it skipped.

    Raises:
        CheckpointError: when checkpoints exist but none is readable, or none exists.
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
