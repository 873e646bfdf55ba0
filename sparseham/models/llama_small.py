"""The small Llama subject: a Llama pretrained here, on text every machine has, for one-shot pruning.

No model can be downloaded, so the pretrained causal LM of the pruning studies is built on the
spot (``python -m sparseham.models.llama_small --root data``, or :func:`build_llama_small`; not
``sparseham fetch``: data sets sit below the training app, and this runs it), in three resumable
steps under
``ROOT/llama_small/``:

1. ``tokenizer/``: a byte-level BPE tokenizer (GPT-2's scheme, :data:`VOCAB` tokens, one special
   ``<|endoftext|>``) trained with ``tokenizers`` on the first :data:`TOKENIZER_FRACTION` of the
   corpus bytes, so the held-out text at its end is not seen by the tokenizer either;
2. ``run/``: ``sparseham train --config llama_small`` (the shipped config: 4 layers, hidden 256,
   dense AdamW, sequences of 256 tokens of this Python's standard-library sources) with
   ``data.text.tokenizer`` set to that tokenizer; a killed build resumes from its checkpoint;
3. ``model/``: the run exported with ``sparseham export --format hf``: a ``save_pretrained``
   directory with the tokenizer and the run's text settings (``sparseham.json``), so
   ``sparseham eval ROOT/llama_small/model`` holds out the run's test text.

Every step is skipped when its output exists. The training step takes most of the time; the
measured numbers (time, perplexities) are in the README's section on pretrained subjects.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CONFIG", "SUBJECT", "TOKENIZER_FRACTION", "VOCAB", "build_llama_small", "train_tokenizer"]

SUBJECT = "llama_small"
#: The shipped config the subject is trained with.
CONFIG = "llama_small"
VOCAB = 4096
#: The leading fraction of the corpus bytes the tokenizer learns from (the test text is the last 5%).
TOKENIZER_FRACTION = 0.9
_SPECIAL = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int, out: str | Path) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` and save it as a ``transformers`` tokenizer.

    Byte-level: every text encodes (no unknown token) and decodes back exactly. The training is
    deterministic: the same texts give the same merges.

    Returns:
        ``out``, which ``AutoTokenizer.from_pretrained`` loads.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[_SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=_SPECIAL, eos_token=_SPECIAL)
    wrapped.save_pretrained(str(out))
    return Path(out)


def _tokenizer(folder: Path, source: str, max_bytes: int) -> Path:
    from sparseham.data.text import has_tokenizer, read_corpus

    if has_tokenizer(folder):
        return folder
    corpus = read_corpus(source, max_bytes)
    head = bytes(corpus[: int(len(corpus) * TOKENIZER_FRACTION)].numpy())
    tmp = folder.with_name(folder.name + ".partial")
    train_tokenizer([head.decode("utf-8", errors="replace")], VOCAB, tmp)
    tmp.replace(folder)
    return folder


def build_llama_small(root: str | Path = "data", *, overrides: list[str] | tuple[str, ...] = (),
                      progress: bool = True) -> Path:
    """Build (or find) the subject under ``root/llama_small`` (see the module docstring).

    Args:
        overrides: ``--set`` values for the training run (tests shrink it with them).
        progress: the training run's progress line.

    Returns:
        The ``save_pretrained`` directory ``root/llama_small/model``.

    Raises:
        ValueError: the run or the export failed (one line).
    """
    from sparseham.config import load_config
    from sparseham.export import export_run
    from sparseham.train import run

    home = Path(root) / SUBJECT
    model = home / "model"
    if (model / "config.json").is_file():
        return model
    home.mkdir(parents=True, exist_ok=True)
    base = load_config(CONFIG, list(overrides))
    tokenizer = _tokenizer(home / "tokenizer", base.data.text.source, base.data.text.max_bytes)
    sets = [*overrides, f"data.text.tokenizer={tokenizer.resolve()}", f"logging.progress={progress}"]
    code = run(load_config(CONFIG, sets), home / "run")
    if code:
        raise ValueError(f"training {home / 'run'} stopped with status {code}; re-run to resume it")
    export_run(home / "run", model, "hf")
    return model


def main(argv: list[str] | None = None) -> int:
    """``python -m sparseham.models.llama_small [--root data]``: build the subject; exit 0, or 2
    with one line."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m sparseham.models.llama_small",
                                     description="Pretrain (or find) the small Llama subject.")
    parser.add_argument("--root", default="data", help="the data root (default: data)")
    args = parser.parse_args(argv)
    try:
        print(build_llama_small(args.root))
    except (OSError, ValueError) as e:
        print(f"llama_small: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
