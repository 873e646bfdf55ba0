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

import contextlib
import hashlib
import os
import random
import re
from pathlib import Path
from typing import Any

import torch

from sparseham import sharding

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "latest_good_checkpoint",
    "candidates",
    "rng_state",
    "set_rng_state",
    "full_tree",
    "shard_model_state",
    "shard_optimizer_state",
]

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


class _Recorder:
    """A file wrapper that keeps the ``OSError`` of a failed write.

    ``torch.save`` turns a failed write (disk full, file too large) into a ``RuntimeError`` that
    says only "unexpected pos"; the recorded error names the real cause.
    """

    def __init__(self, file) -> None:
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def _write(state: dict[str, Any], tmp: Path) -> None:
    with open(tmp, "wb") as f:
        out = _Recorder(f)
        try:
            torch.save({**state, "sha256": _digest(state)}, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(state: dict[str, Any], run_dir: str | os.PathLike, *, keep: int = 2) -> Path:
    """Atomically write ``state`` (which must hold ``"step"``) and re-point ``checkpoint.pt`` at it.

    Raises:
        CheckpointError: the file cannot be written (disk full, read-only directory); the previous
            checkpoint is left as it was.
    """
    run_dir = Path(run_dir)
    numbered = run_dir / f"checkpoint-{int(state['step'])}.pt"
    tmp, link = run_dir / ".checkpoint.tmp", run_dir / ".checkpoint.link"
    try:
        _write(state, tmp)
        os.replace(tmp, numbered)
        link.unlink(missing_ok=True)
        os.link(numbered, link)
        os.replace(link, run_dir / LATEST)
        _fsync_dir(run_dir)
    except OSError as e:
        _discard(tmp)
        raise CheckpointError(
            f"cannot write {numbered.name} in {run_dir}: {e.strerror or e}; the previous checkpoint is "
            "intact; free disk space or make the directory writable, then re-run the same command"
        ) from None
    for old in _numbered(run_dir)[keep:]:
        old.unlink(missing_ok=True)
    return run_dir / LATEST


def _discard(path: Path) -> None:
    # Best effort: the directory may be read-only; a stale temp file is overwritten next time.
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


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
    """Checkpoint files in ``run_dir``, newest step first.

    ``checkpoint.pt`` stands in for the numbered file it links to. A kill between writing
    ``checkpoint-<step>.pt`` and re-pointing ``checkpoint.pt`` leaves a numbered file newer than
    ``checkpoint.pt``; it comes first.
    """
    run_dir = Path(run_dir)
    latest, numbered = run_dir / LATEST, _numbered(run_dir)
    if not latest.exists():
        return numbered
    same = [i for i, p in enumerate(numbered) if os.path.samefile(p, latest)]
    if not same:  # a checkpoint.pt copied in without its numbered twin
        return [latest, *numbered]
    return [*numbered[: same[0]], latest, *numbered[same[0] + 1 :]]


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
        raise CheckpointError(
            f"no readable checkpoint in {run_dir}: {'; '.join(problems)}; delete the damaged files or "
            "choose another --out to start over"
        )
    raise CheckpointError(f"no checkpoint in {run_dir}")


def rng_state() -> dict[str, Any]:
    """The host and device random-number states, for a checkpoint."""
    return {
        "torch": torch.get_rng_state(),
        "random": random.getstate()[1],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state` (``random``'s version 3 state, as ``random.getstate`` gives it)."""
    torch.set_rng_state(state["torch"].cpu())
    random.setstate((3, tuple(state["random"]), None))
    if state["cuda"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# -- FSDP2: a checkpoint holds whole tensors; a sharded run gathers and re-shards them ----------
def full_tree(obj):
    """``obj`` (nested dicts, lists, tuples) with every sharded tensor gathered whole: a
    checkpoint's full state dicts. A collective: every rank calls it, in the same order."""
    if sharding.is_sharded(obj):
        return obj.full_tensor()
    if isinstance(obj, dict):
        return {k: full_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_tree(v) for v in obj)
    return obj


def shard_model_state(saved: dict, model) -> dict:
    """A full model state dict as the shards of ``model``'s own (sharded) entries."""
    current = model.state_dict()
    return {k: sharding.local_slice(v, current[k]) if k in current else v for k, v in saved.items()}


def shard_optimizer_state(saved: dict, optimizer) -> dict:
    """A full optimizer state dict with each state tensor shaped like its parameter turned into
    that parameter's shards (state is keyed by the parameters' order over the param groups)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entry in saved["state"].items():
        p = params[index]
        state[index] = {k: sharding.local_slice(v, p) if torch.is_tensor(v) and v.shape == p.shape else v
                        for k, v in entry.items()}
    return {**saved, "state": state}
