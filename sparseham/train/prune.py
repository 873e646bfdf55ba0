"""``sparseham prune``: one-shot pruning of a saved Hugging Face causal LM with calibration text.

    sparseham prune MODEL_DIR --method wanda|sparsegpt|magnitude --sparsity 0.5|2:4
                    [--calib FILE|DIR|stdlib] [--nsamples N] [--seqlen L] --out DIR

The model is loaded with ``AutoModelForCausalLM`` from ``MODEL_DIR`` (a ``save_pretrained``
directory; nothing is downloaded) and the text is tokenized with the model's own tokenizer when the
directory has one, or read as bytes when the model's vocabulary is the 256 bytes (a model trained by
``sparseham train`` on ``data.dataset: text``). The first ``N`` windows of ``L`` tokens calibrate
(:func:`sparseham.oneshot.prune`); the windows after them (up to ``--eval-windows``) are held out,
and the perplexity on them is printed before and after pruning.

``--out`` receives a ``save_pretrained`` directory (pruned weights exactly zero; plain
``transformers`` loads it), the tokenizer, ``masks.safetensors`` (one bool mask per managed weight,
under its parameter name) and ``prune.json`` (what was done, and the perplexities). It is written
beside its final place and renamed at the end, so an interrupted prune leaves no ``--out``.
Bad input (not a model, too little text, an N:M pattern a layer cannot take, a sparsity outside
[0, 1), a model type that is not a causal LM, an existing ``--out``) gets one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from sparseham.data.files import DataError
from sparseham.data.text import read_corpus
from sparseham.oneshot import METHODS, OWL, check_request, prune
from sparseham.params import managed_summary

__all__ = ["main", "parse_sparsity", "load_model", "tokens_of", "perplexity"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "spiece.model")


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="sparseham prune", description=__doc__.split("\n\n")[0])
    p.add_argument("model", metavar="MODEL_DIR", help="a save_pretrained directory of a causal LM")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--sparsity", required=True, help="fraction of zeros in [0, 1), or N:M such as 2:4")
    p.add_argument("--calib", default="stdlib", help="calibration text: a file, a folder, a glob or stdlib "
                                                     "(this Python's standard-library sources)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows for perplexity")
    p.add_argument("--distribution", default="uniform", choices=("uniform", "global"),
                   help="per-layer allocation (default uniform, as the references)")
    p.add_argument("--owl", action="store_true",
                   help="OWL's outlier-weighted layer sparsities (M=5, lambda=0.08)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    return p


def parse_sparsity(text: str) -> tuple[float, tuple[int, int] | None]:
    """``"0.5"`` -> ``(0.5, None)``; ``"2:4"`` -> ``(0.5, (2, 4))`` (N:M keeps n of every m)."""
    if ":" in text:
        try:
            n, m = (int(v) for v in text.split(":"))
        except ValueError:
            raise ValueError(f"--sparsity {text!r} is not N:M with integers, e.g. 2:4") from None
        if not 0 < n < m:
            raise ValueError(f"--sparsity {text}: N:M needs 0 < N < M")
        return 1 - n / m, (n, m)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--sparsity {text!r} is not a number in [0, 1) or N:M such as 2:4") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"--sparsity {text} is outside [0, 1)")
    return value, None


def load_model(directory: str, device: torch.device) -> tuple[nn.Module, object | None]:
    """The causal LM in ``directory`` and its tokenizer (``None`` when it has none, then the
    vocabulary must be the 256 bytes)."""
    import transformers

    transformers.logging.set_verbosity_error()  # our lines, not its progress bars and notices
    transformers.logging.disable_progress_bar()
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise ValueError(f"{directory} is not a model directory (no config.json; give a save_pretrained "
                         "folder)")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype="auto")
    except ValueError as e:
        kind = getattr(locals().get("config"), "model_type", "?")
        raise ValueError(f"{directory}: model type {kind!r} is not a causal language model that transformers "
                         f"can load ({str(e).splitlines()[0][:120]})") from None
    except OSError as e:
        raise ValueError(f"{directory}: cannot load the model: {str(e).splitlines()[0]}") from None
    tokenizer = None
    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    elif config.vocab_size != 256:
        raise ValueError(f"{directory} has no tokenizer and a vocabulary of {config.vocab_size}, not the 256 "
                         "bytes of raw text; save its tokenizer beside it (tokenizer.save_pretrained)")
    return model.to(device).eval(), tokenizer


def tokens_of(source: str, tokenizer, count: int) -> torch.Tensor:
    """Up to ``count`` token ids of the text in ``source``, as int64: bytes, or the tokenizer's ids."""
    if tokenizer is None:
        return read_corpus(source, count).long()
    # About 4 bytes a token for BPE on code and prose; 8 leaves room.
    text = bytes(read_corpus(source, 8 * count).tolist()).decode("utf-8", errors="replace")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids[:count], dtype=torch.long)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch: int = 8) -> float:
    """exp of the mean next-token loss over ``windows`` ``(W, L)``."""
    total, count = 0.0, 0
    for chunk in windows.split(batch):
        loss = model(input_ids=chunk, labels=chunk, use_cache=False).loss
        n = chunk.shape[0] * (chunk.shape[1] - 1)
        total, count = total + float(loss) * n, count + n
    return math.exp(total / count)


def _windows(args, tokenizer, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration windows and held-out windows, ``(N, L)`` each, in text order."""
    for key in ("nsamples", "seqlen", "eval_windows"):
        if getattr(args, key) < (2 if key == "seqlen" else 1):
            raise ValueError(f"--{key.replace('_', '-')} must be >= {2 if key == 'seqlen' else 1}")
    ids = tokens_of(args.calib, tokenizer, (args.nsamples + args.eval_windows) * args.seqlen)
    rows = ids[: ids.numel() // args.seqlen * args.seqlen].view(-1, args.seqlen).to(device)
    if rows.shape[0] == 0:
        raise ValueError(f"--calib {args.calib} holds {ids.numel()} tokens, shorter than one window of "
                         f"--seqlen {args.seqlen}")
    calib = rows[: min(args.nsamples, rows.shape[0])]
    return calib, rows[calib.shape[0]:]


def _write(out: Path, model: nn.Module, tokenizer, result, record: dict) -> None:
    """Everything into a temporary folder beside ``out``, then one rename."""
    from safetensors.torch import save_file

    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file({n: m.contiguous().cpu() for n, m in zip(result.names, result.masks)},
                  str(tmp / "masks.safetensors"))
        (tmp / "prune.json").write_text(json.dumps(record, indent=2) + "\n")
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu or cuda[:N]") from None


def run(args: argparse.Namespace) -> dict:
    """Prune as ``args`` say and write ``--out``; returns the ``prune.json`` record."""
    sparsity, pattern = parse_sparsity(args.sparsity)
    out = Path(args.out)
    if out.exists() or out.is_symlink():
        raise ValueError(f"--out {out} exists; choose a new directory (nothing was written)")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: its parent folder {out.parent} does not exist")
    device = _device(args.device)
    model, tokenizer = load_model(args.model, device)
    owl = OWL() if args.owl else None
    how = {"method": args.method, "sparsity": sparsity, "pattern": pattern, "distribution": args.distribution,
           "owl": owl}
    check_request(model, **how)  # before the perplexity: a bad request costs no pass over the text
    calib, held = _windows(args, tokenizer, device)
    print(managed_summary(model), flush=True)
    before = perplexity(model, held) if held.numel() else None
    start = time.perf_counter()
    result = prune(model, list(calib.split(8)), **how)
    seconds = time.perf_counter() - start
    after = perplexity(model, held) if held.numel() else None
    record = {"model": str(args.model), "method": args.method, "sparsity": result.sparsity,
              "pattern": f"{pattern[0]}:{pattern[1]}" if pattern else None,
              "distribution": args.distribution, "owl": args.owl, "calib": args.calib,
              "calibration_windows": calib.shape[0], "seqlen": args.seqlen, "held_out_windows": held.shape[0],
              "perplexity_before": before, "perplexity_after": after, "prune_seconds": seconds,
              "layers": dict(zip(result.names, result.kept))}
    _write(out, model, tokenizer, result, record)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)
    try:
        record = run(args)
    except (ValueError, DataError) as e:
        print(f"sparseham prune: error: {e}", file=sys.stderr)
        return 2
    if record["perplexity_before"] is None:
        ppl = "no held-out window left after the calibration windows: give more text or fewer --nsamples"
    else:
        ppl = f"{record['perplexity_before']:.4g} before, {record['perplexity_after']:.4g} after"
    print(f"pruned {args.model} with {args.method} to sparsity {record['sparsity']:.4f} on "
          f"{record['calibration_windows']} windows of {args.seqlen} tokens in "
          f"{record['prune_seconds']:.1f} s; held-out perplexity ({record['held_out_windows']} windows): "
          f"{ppl}; wrote {args.out}")
    return 0
