"""Real English sentences that every machine has: the first sentence of each docstring in this
Python's standard library.

The files are :func:`~sparseham.data.text.corpus_files` ``("stdlib")`` in sorted order (the ``.py``
sources without ``site-packages``, ``test`` and ``idlelib``); in each, the docstrings of the module,
its classes and functions in source order. A docstring's first sentence is its first paragraph,
whitespace collapsed, cut after the first ``.``, ``!`` or ``?`` that a space or the end follows
(not the one of "e.g." or "i.e.").
Kept are sentences of :data:`MIN_CHARS` to :data:`MAX_CHARS` characters with at least three words,
each once (the first occurrence). A file that does not parse is skipped.

:func:`sentence_split` draws a fixed number of them with a seeded permutation and halves it into
calibration and held-out sentences, so both halves cover the whole library.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import warnings

import torch

from sparseham.data.text import corpus_files

__all__ = ["MAX_CHARS", "MIN_CHARS", "SENTENCE_SEED", "docstring_sentences", "first_sentence", "sentence_split"]

MIN_CHARS, MAX_CHARS = 20, 300
#: Fixes the draw of :func:`sentence_split`.
SENTENCE_SEED = 0x5EED
_END = re.compile(r"(?<!e\.g\.)(?<!i\.e\.)(?<=[.!?])(\s|$)")
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def first_sentence(docstring: str) -> str | None:
    """The first sentence of ``docstring`` (see the module docstring), or None if none is kept."""
    paragraph = inspect.cleandoc(docstring).split("\n\n", 1)[0]
    text = " ".join(paragraph.split())
    end = _END.search(text)
    sentence = text[: end.start()] if end else text
    if not MIN_CHARS <= len(sentence) <= MAX_CHARS or len(sentence.split()) < 3:
        return None
    return sentence


def _docstrings(source: bytes) -> list[str]:
    with warnings.catch_warnings():  # invalid escape sequences in old sources
        warnings.simplefilter("ignore")
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return []
    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, _DOCUMENTED)),
                   key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))
    return [doc for doc in map(ast.get_docstring, nodes) if doc]


def docstring_sentences() -> list[str]:
    """Every kept first sentence of the standard library's docstrings, in order, each once."""
    return list(_sentences())


@functools.cache  # parsing the whole standard library takes seconds; it does not change in a process
def _sentences() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for path in corpus_files("stdlib"):
        try:
            source = path.read_bytes()
        except OSError:
            continue
        for doc in _docstrings(source):
            sentence = first_sentence(doc)
            if sentence is not None:
                seen.setdefault(sentence)
    return tuple(seen)


def sentence_split(count: int = 1024, seed: int = SENTENCE_SEED) -> tuple[list[str], list[str]]:
    """``(calibration, held_out)``: ``count`` sentences drawn with ``seed``, halved.

    Raises:
        ValueError: ``count`` is not an even number of at least 2, or exceeds the sentences there are.
    """
    sentences = docstring_sentences()
    if isinstance(count, bool) or not isinstance(count, int) or count < 2 or count % 2:
        raise ValueError(f"count = {count!r}; expected an even number >= 2")
    if count > len(sentences):
        raise ValueError(f"count = {count} exceeds the {len(sentences)} docstring sentences of this Python")
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    drawn = [sentences[i] for i in order]
    return drawn[: count // 2], drawn[count // 2:]
