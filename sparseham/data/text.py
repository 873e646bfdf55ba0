"""Causal language modelling on local text, byte-level: ``data.dataset: text``.

The tokenizer is the identity on UTF-8 bytes (vocabulary 256), so nothing is downloaded and any
file works. The corpus is the concatenation of the files in sorted path order, cut to
``max_bytes``; by default it is this Python's own standard library (its ``.py`` sources, without
``site-packages`` and the ``test`` package), which ships with every install.

The corpus is cut into non-overlapping windows of ``seq_len + 1`` bytes. The splits are
contiguous blocks of windows, in corpus order: train, then validation (``val_split`` of the
windows before the test block), then test (the last ``test_fraction``), so held-out text is never
a neighbour of training text in the middle of a file. A batch is ``(x, y)``: ``x`` the first
``seq_len`` bytes of each window as int64 ``(B, seq_len)``, ``y`` the next-byte targets
flattened to ``(B * seq_len,)``, so a model that returns ``(B * seq_len, 256)`` logits trains
with the same cross-entropy and accuracy as a classifier (accuracy is next-byte accuracy).
"""

from __future__ import annotations

import glob
import sysconfig
from pathlib import Path

import torch
from torch import Tensor

from sparseham.data.files import DataError
from sparseham.data.loaders import BatchLoader

__all__ = ["VOCAB_SIZE", "TokenLoader", "corpus_files", "read_corpus", "windows"]

VOCAB_SIZE = 256
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "idlelib", "__pycache__"}


def corpus_files(source: str) -> list[Path]:
    """The files of ``source`` in sorted order: ``stdlib``, a file, a folder (every file below
    it) or a glob."""
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        return sorted(p for p in root.rglob("*.py") if not _STDLIB_SKIP & set(p.relative_to(root).parts))
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())


def read_corpus(source: str, max_bytes: int) -> Tensor:
    """The first ``max_bytes`` bytes of the concatenated files, as a uint8 tensor.

    Raises:
        DataError: no files, or a file that cannot be read.
    """
    files = corpus_files(source)
    if not files:
        raise DataError(f"data.text.source = {source!r} names no files; give 'stdlib', a text file, a "
                        "folder or a glob")
    parts, size = [], 0
    for path in files:
        try:
            data = path.read_bytes()[: max_bytes - size]
        except OSError as err:
            raise DataError(f"cannot read {path}: {err.strerror or err}") from None
        parts.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)


def windows(corpus: Tensor, seq_len: int) -> Tensor:
    """Non-overlapping windows of ``seq_len + 1`` tokens, ``(N, seq_len + 1)``; the tail is dropped."""
    n = corpus.numel() // (seq_len + 1)
    return corpus[: n * (seq_len + 1)].view(n, seq_len + 1)


class TokenLoader(BatchLoader):
    """A :class:`BatchLoader` over rows of ``windows`` (see the module docstring for a batch).

    Args:
        windows: ``(N, seq_len + 1)`` token ids.
        **kwargs: ``batch_size``, ``seed``, ``train``, ``rank``, ``world_size`` of
            :class:`BatchLoader`.
    """

    def __init__(self, windows: Tensor, **kwargs) -> None:
        super().__init__(len(windows), **kwargs)
        self.windows = windows

    @property
    def seq_len(self) -> int:
        return self.windows.shape[1] - 1

    def _load(self, batch: Tensor, epoch: int, index: int) -> tuple[Tensor, Tensor]:
        rows = self.windows[batch[self._shard(len(batch))]].long()
        return rows[:, :-1], rows[:, 1:].reshape(-1)
