"""Evaluation without training: ``sparseham eval RUN|DIR``.

- ``RUN``, a run directory of ``sparseham train``: its config rebuilds the data and the model, the
  newest good checkpoint's weights go in with the masks baked in (as ``sparseham export`` writes
  them), and the test split (or ``--split val``) is evaluated as the run evaluates it: perplexity
  for a language model, accuracy for a classifier.
- ``DIR``, a ``save_pretrained`` directory of a causal LM: the held-out text is cut as
  ``sparseham train`` cuts ``data.text`` (:func:`~sparseham.data.text.text_windows`), with the
  settings in the directory's ``sparseham.json`` when it has one (a ``sparseham export --format
  hf``), else ``data.text``'s defaults; ``--source`` and the other text options override them.

The result is one line, or a JSON object with ``--json``. Bad input is one line on stderr and
exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from sparseham.models.hf import quiet_progress_bars
from sparseham.train.evaluation import evaluate

__all__ = ["evaluate_dir", "evaluate_lm", "evaluate_run", "held_out_windows", "main"]

_TEXT_KEYS = ("source", "seq_len", "max_bytes", "test_fraction")


def _result(split: str, loss: float, acc: float, count: int, language_model: bool) -> dict:
    from sparseham.train.logger import perplexity

    out = {"split": split, "loss": loss, "accuracy": acc, "targets": count}
    if language_model:
        out["perplexity"] = perplexity(loss)
    return out


def evaluate_run(run: str | Path, *, split: str = "test", device: str = "cpu") -> dict:
    """Loss and accuracy (and perplexity for a language model) of a run's newest good checkpoint.

    Raises:
        ValueError, ConfigError, DataError: the run, its checkpoint or its data cannot be used.
    """
    from sparseham.config import load_config
    from sparseham.export import dense_state
    from sparseham.train.build import build_data_and_model, resolve_device
    from sparseham.train.checkpoint import CheckpointError, latest_good_checkpoint

    run = Path(run)
    cfg = load_config(run / "config.yaml")
    try:
        _, state, _ = latest_good_checkpoint(run)
    except (CheckpointError, FileNotFoundError) as e:
        raise ValueError(f"{run}: no readable checkpoint ({e})") from None
    where = resolve_device(device)
    data, model = build_data_and_model(cfg, SimpleNamespace(rank=0, world_size=1), where)
    manager = state.get("manager") or {}
    names, masks = manager.get("names") or [], manager.get("masks")
    try:
        model.load_state_dict(dense_state(state["model"], dict(zip(names, masks)) if masks else None))
    except (RuntimeError, KeyError) as e:
        first = str(e).splitlines()[0]
        raise ValueError(f"{run}: the checkpoint does not fit the run's model ({first})") from None
    loader = getattr(data, split)
    if loader is None:
        raise ValueError(f"{run} has no {split} split (data.val_split is 0); use --split test")
    loss, acc = evaluate(model, {split: loader}, where)[split]
    count = loader.num_samples * (data.info.seq_len or 1)
    return _result(split, loss, acc, count, cfg.model.name.startswith("hf:"))


def held_out_windows(model_dir: str | Path, *, split: str = "test", **text) -> torch.Tensor:
    """The windows ``(N, seq_len + 1)`` of ``split`` of the text for the model in ``model_dir``.

    Args:
        **text: ``source``, ``seq_len``, ``max_bytes``, ``test_fraction`` and ``val_split``; unset
            ones come from the directory's ``sparseham.json``, then ``data.text``'s defaults.

    Raises:
        ValueError, DataError: text that cannot be used, or an empty split.
    """
    from sparseham.data.text import TEXT_DEFAULTS, text_windows
    from sparseham.models.hf_io import read_metadata

    meta = read_metadata(model_dir)
    saved = meta.get("text") if isinstance(meta.get("text"), dict) else {}
    options = {k: saved.get(k, TEXT_DEFAULTS[k]) for k in _TEXT_KEYS}
    options["val_split"] = meta.get("val_split", 0.0)
    options.update({k: v for k, v in text.items() if v is not None})
    rows = text_windows(model_dir, int(options.pop("seq_len")), split=split, **options)
    if len(rows) == 0:
        raise ValueError(f"the {split} split of the text is empty; use --split test")
    return rows


def evaluate_lm(model: nn.Module, rows: torch.Tensor, *, device: str = "cpu", batch_size: int = 32,
                split: str = "test") -> dict:
    """Loss, next-token accuracy and perplexity of the causal LM ``model`` (a
    :class:`~sparseham.models.hf.CausalLM`) on the windows ``rows``, as ``sparseham train`` evaluates."""
    from sparseham.data.text import TokenLoader
    from sparseham.train.build import resolve_device

    where = resolve_device(device)
    loader = TokenLoader(rows, train=False, batch_size=batch_size, seed=0)
    loss, acc = evaluate(model.to(where), {split: loader}, where)[split]
    return _result(split, loss, acc, rows[:, 1:].numel(), True)


def evaluate_dir(model_dir: str | Path, *, split: str = "test", device: str = "cpu", batch_size: int = 32,
                 **text) -> dict:
    """Perplexity of the causal LM in the ``save_pretrained`` directory ``model_dir`` on held-out
    text (:func:`held_out_windows`, whose ``**text`` this takes).

    Raises:
        ValueError, DataError: not a causal LM directory, or text that cannot be used.
    """
    from sparseham.models.hf_io import load_causal_lm

    model = load_causal_lm(model_dir)
    rows = held_out_windows(model_dir, split=split, **text)
    return evaluate_lm(model, rows, device=device, batch_size=batch_size, split=split)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # a usage error is one line and status 2, as every other bad input
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sparseham eval", description=__doc__.split("\n")[0])
    p.add_argument("target", metavar="RUN|DIR", help="a run directory, or a save_pretrained directory")
    p.add_argument("--split", default="test", choices=("test", "val"),
                   help="the held-out split (default test)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a line")
    text = p.add_argument_group("the text of a save_pretrained DIR",
                                "default: its sparseham.json, else data.text's defaults")
    text.add_argument("--source", help="stdlib, a file, a folder or a glob")
    text.add_argument("--seq-len", type=int, help="tokens per sequence")
    text.add_argument("--max-bytes", type=int, help="bytes of the corpus read")
    text.add_argument("--test-fraction", type=float, help="the held-out fraction at the end of the corpus")
    text.add_argument("--batch-size", type=int, default=32, help="sequences per batch (default 32)")
    return p


def _line(target: str, r: dict) -> str:
    if "perplexity" in r:
        return (f"{target}: {r['split']} perplexity {r['perplexity']:.4f} (loss {r['loss']:.4f}, next-token "
                f"accuracy {r['accuracy']:.4f}, {r['targets']:,} tokens)")
    return (f"{target}: {r['split']} accuracy {r['accuracy']:.4f} (loss {r['loss']:.4f}, "
            f"{r['targets']:,} samples)")


def _check(args: argparse.Namespace) -> None:
    for key in ("seq_len", "max_bytes", "batch_size"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise ValueError(f"--{key.replace('_', '-')} {value}: expected an int >= 1")
    if args.test_fraction is not None and not 0 < args.test_fraction < 1:
        raise ValueError(f"--test-fraction {args.test_fraction}: expected a fraction in (0, 1)")


def main(argv: Sequence[str] | None = None) -> int:
    """``sparseham eval``; returns the exit status (0, or 2 with one line on bad input)."""
    from sparseham.config import ConfigError
    from sparseham.data import DataError

    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2, one line already printed)
        return int(stop.code or 0)
    target = Path(args.target)
    quiet_progress_bars()
    try:
        _check(args)
        if (target / "config.yaml").is_file():
            result = evaluate_run(target, split=args.split, device=args.device)
        elif (target / "config.json").is_file():
            text = {k: getattr(args, k) for k in _TEXT_KEYS}
            result = evaluate_dir(target, split=args.split, device=args.device, batch_size=args.batch_size,
                                  **text)
        elif not target.exists():
            raise ValueError(f"{args.target}: no such directory; give a run directory or a save_pretrained "
                             "one")
        else:
            raise ValueError(f"{args.target} is neither a run directory (config.yaml) nor a save_pretrained "
                             "directory (config.json)")
    except (ConfigError, DataError, ValueError) as e:
        print(f"sparseham eval: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"target": str(target), **result}) if args.json else _line(str(target), result))
    return 0
