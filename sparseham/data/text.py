"""Causal language modelling on local text: ``data.dataset: text``.

The corpus is the concatenation of the files in sorted path order, cut to ``max_bytes``; by
default it is this Python's own standard library (its ``.py`` sources, without ``site-packages``
and the ``test`` package), which ships with every install.

The tokens are the UTF-8 bytes (vocabulary 256, nothing to download, any file works) unless a
tokenizer is given: a directory written by ``save_pretrained`` (a pretrained model's own, found
by ``data.text.tokenizer: auto`` in ``model.pretrained``), loaded with
``transformers.AutoTokenizer``. Each file is then decoded as UTF-8 (bad bytes replaced) and
tokenized on its own without special tokens, and the files' ids are concatenated as the bytes are.
A model whose vocabulary is not 256 is refused on bytes (:func:`check_byte_vocabulary`): its ids
would mean nothing.

The token stream is cut into non-overlapping windows of ``seq_len + 1`` tokens. The splits are
contiguous blocks of windows, in corpus order: train, then validation (``val_split`` of the
windows before the test block), then test (the last ``test_fraction``), so held-out text is never
a neighbour of training text in the middle of a file. A batch is ``(x, y)``: ``x`` the first
``seq_len`` tokens of each window as int64 ``(B, seq_len)``, ``y`` the next-token targets
flattened to ``(B * seq_len,)``, so a model that returns ``(B * seq_len, vocab)`` logits trains
with the same cross-entropy and accuracy as a classifier (accuracy is next-token accuracy).

:func:`token_sequences` (and :func:`text_windows`) give other code (calibration, fine-tuning,
evaluation) the same windows for a model directory.
"""

from __future__ import annotations

import glob
import json
import sysconfig
from pathlib import Path

import torch
from torch import Tensor

from sparseham.data.files import DataError
from sparseham.data.loaders import BatchLoader

__all__ = [
    "TEXT_DEFAULTS", "TOKENIZER_FILES", "VOCAB_SIZE", "TokenLoader", "check_byte_vocabulary", "corpus_files",
    "has_tokenizer", "load_tokenizer", "read_corpus", "read_tokens", "resolve_tokenizer", "split_windows",
    "text_windows", "token_sequences", "windows",
]

VOCAB_SIZE = 256
#: ``data.text``'s defaults (:class:`~sparseham.config.schema.TextConfig` has the same).
TEXT_DEFAULTS = {"source": "stdlib", "seq_len": 128, "max_bytes": 4_000_000, "test_fraction": 0.05,
                 "tokenizer": "auto"}
#: The files of which one marks a directory as holding a ``transformers`` tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")
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


def _read_files(source: str, max_bytes: int) -> list[bytes]:
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
    return parts


def read_corpus(source: str, max_bytes: int) -> Tensor:
    """The first ``max_bytes`` bytes of the concatenated files, as a uint8 tensor.

    Raises:
        DataError: no files, or a file that cannot be read.
    """
    return torch.frombuffer(bytearray(b"".join(_read_files(source, max_bytes))), dtype=torch.uint8)


def has_tokenizer(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds one of :data:`TOKENIZER_FILES`."""
    return any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES)


def resolve_tokenizer(setting: str, pretrained: str | None) -> str | None:
    """The directory whose tokenizer ``data.text.tokenizer = setting`` names, or None for bytes.

    ``auto`` is ``pretrained``'s tokenizer when it has one, ``bytes`` is none, anything else a
    directory that must hold one.

    Raises:
        DataError: a directory without tokenizer files.
    """
    if setting == "bytes":
        return None
    if setting == "auto":
        return pretrained if pretrained and has_tokenizer(pretrained) else None
    if not has_tokenizer(setting):
        raise DataError(f"data.text.tokenizer = {setting!r} holds no tokenizer (none of "
                        f"{', '.join(TOKENIZER_FILES)}); give a directory written by save_pretrained, "
                        "auto or bytes")
    return setting


def load_tokenizer(model_dir: str | Path):
    """``transformers.AutoTokenizer`` of the local directory ``model_dir`` (no download).

    Raises:
        DataError: the files are there but do not load.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"cannot load the tokenizer in {model_dir}: {first}") from None


def check_byte_vocabulary(model_dir: str | Path, why: str = "it holds no tokenizer") -> None:
    """Refuse byte-level text for the model in ``model_dir`` unless its vocabulary is 256; ``why``
    says why the text are bytes.

    Raises:
        DataError: ``config.json`` names another ``vocab_size``.
    """
    try:
        vocab = json.loads((Path(model_dir) / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return  # not a readable model config: loading the model says what is wrong
    if vocab is not None and vocab != VOCAB_SIZE:
        raise DataError(f"model.pretrained = {str(model_dir)!r} has a vocabulary of {vocab}, but the text "
                        f"data are bytes ({VOCAB_SIZE} tokens: {why}); put the model's tokenizer files in "
                        "its directory, or set data.text.tokenizer to a directory that holds them")


def read_tokens(source: str, max_bytes: int, tokenizer: str | Path | None = None) -> tuple[Tensor, int]:
    """The corpus (see :func:`read_corpus`) as one stream of token ids, and the vocabulary size.

    Args:
        tokenizer: a directory holding a ``transformers`` tokenizer, or None for bytes.

    Returns:
        ``(ids, vocab)``: uint8 bytes and 256, or the tokenizer's int32 ids and ``len(tokenizer)``.
    """
    if tokenizer is None:
        return read_corpus(source, max_bytes), VOCAB_SIZE
    tok = load_tokenizer(tokenizer)
    texts = [part.decode("utf-8", errors="replace") for part in _read_files(source, max_bytes)]
    # verbose=False: a whole file is longer than the model's context, which is what windows are for.
    ids = tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor([i for row in ids for i in row], dtype=torch.int32), len(tok)


def windows(corpus: Tensor, seq_len: int) -> Tensor:
    """Non-overlapping windows of ``seq_len + 1`` tokens, ``(N, seq_len + 1)``; the tail is dropped."""
    n = corpus.numel() // (seq_len + 1)
    return corpus[: n * (seq_len + 1)].view(n, seq_len + 1)


def split_windows(rows: Tensor, test_fraction: float, val_split: float = 0.0) -> dict[str, Tensor]:
    """``{"train", "val", "test"}``: contiguous blocks of ``rows`` (see the module docstring).

    Raises:
        DataError: nothing is left for training.
    """
    n = len(rows)
    test = max(1, round(n * test_fraction))
    val = round((n - test) * val_split)
    train = n - test - val
    if train < 1:
        raise DataError(f"data.text: {n} sequences of {rows.shape[1]} tokens leave none for training; "
                        "raise data.text.max_bytes or lower seq_len")
    return {"train": rows[:train], "val": rows[train:train + val], "test": rows[n - test:]}


def text_windows(model_dir: str | Path | None, seq_len: int, *, split: str = "train", source: str = "stdlib",
                 max_bytes: int = TEXT_DEFAULTS["max_bytes"], test_fraction: float = TEXT_DEFAULTS["test_fraction"],
                 val_split: float = 0.0) -> Tensor:
    """The windows ``(N, seq_len + 1)`` of one split of the text, tokenized for the model in
    ``model_dir``: its own tokenizer, or bytes when it has none (refused unless its vocabulary is
    256), or bytes for ``model_dir=None``. The arguments are ``data.text``'s and ``data.val_split``.

    Raises:
        DataError: no text, a tokenizer that does not load, a byte vocabulary mismatch, an unknown
            split or too little text.
    """
    if split not in ("train", "val", "test"):
        raise DataError(f"split = {split!r}; expected train, val or test")
    tokenizer = resolve_tokenizer("auto", None if model_dir is None else str(model_dir))
    if model_dir is not None and tokenizer is None:
        check_byte_vocabulary(model_dir)
    ids, _ = read_tokens(source, max_bytes, tokenizer)
    return split_windows(windows(ids, seq_len), test_fraction, val_split)[split]


def token_sequences(model_dir: str | Path | None, seq_len: int, **kwargs) -> Tensor:
    """Text as int64 token-id sequences ``(N, seq_len)`` for the model in ``model_dir``.

    These are the inputs ``x`` of the windows that ``sparseham train`` cuts with the same settings
    (:func:`text_windows`, whose keyword arguments this takes), so calibration (``split="train"``),
    fine-tuning and evaluation (``"test"``) see text tokenized and split the same way.
    """
    return text_windows(model_dir, seq_len, **kwargs)[:, :-1].long()


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
