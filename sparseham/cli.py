"""The ``sparseham`` command: ``sparseham COMMAND [ARGS ...]`` (also ``python -m sparseham``).

Commands:
    train     train a sparse model from a YAML config (``train.py`` is the same)
    prune     prune a saved Hugging Face causal LM once, with calibration text
    report    sign-flip report (HTML + Markdown) of one or more run directories
    sweep     run a grid of training runs and tabulate them
    study     select HAM's settings from a tuning sweep; tabulate a study
    fetch     fetch data sets into a data root
    export    export a run's model: dense, masks, sparse (CSR/COO) or hf (save_pretrained)
    eval      evaluate a run or a save_pretrained directory without training
    configs   list the shipped configs (``--config NAME`` finds them)

``sparseham COMMAND --help`` describes each one.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "train_main"]

# command -> (module whose main(argv) runs it, one-line description)
_COMMANDS = {
    "train": (None, "train a sparse model from a YAML config"),
    "prune": ("sparseham.train.prune", "prune a saved Hugging Face causal LM once, with calibration text"),
    "report": ("sparseham.analysis.report", "sign-flip report (HTML + Markdown) of run directories"),
    "sweep": ("sparseham.analysis.sweep", "run a grid of training runs and tabulate them"),
    "study": ("sparseham.analysis.study", "select HAM's settings from a tuning sweep; tabulate a study"),
    "fetch": ("sparseham.data.fetch", "fetch data sets into a data root"),
    "export": ("sparseham.export", "export a run's model: dense, masks, sparse (CSR/COO) or hf"),
    "eval": ("sparseham.train.evaluate_run", "evaluate a run or a save_pretrained directory"),
    "configs": (None, "list the shipped configs"),
}

_TRAIN_DOC = """Train a sparse model from a YAML config.

    sparseham train --config FILE|NAME [--set key=value ...] [--out DIR]

Re-running the same command on the same directory resumes from its last checkpoint; a finished
run says so and exits 0. Bad configs and data problems exit with status 2 and one line on stderr;
a non-finite loss (``train.on_nonfinite: stop``), an unreadable or unwritable checkpoint, a full or
unwritable run directory and a broken mask invariant exit with status 1 and one line. Any other error during
training is a bug: its traceback, status 1, a ``crash`` record in ``metrics.jsonl``, and the last
checkpoint stays as it was. SIGTERM and SIGINT write a checkpoint and exit with 128 + the signal
number.
"""


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit status 2, as every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _set_values(argv: Sequence[str], known: set[str]) -> list[str]:
    """``--set a=1 b=2`` as ``--set=a=1 --set=b=2``, so that a value starting with ``-`` (``x=-1``
    is fine, ``-x`` is not an option) reaches the config loader instead of argparse."""
    out, in_set, values = [], False, 0
    for token in argv:
        if token == "--set":
            if in_set and not values:
                out.append("--set")  # no value followed: let argparse say so
            in_set, values = True, 0
            continue
        if in_set and token.split("=", 1)[0] not in known:
            out.append(f"--set={token}")
            values += 1
            continue
        if in_set and not values:
            out.append("--set")
        in_set = False
        out.append(token)
    if in_set and not values:
        out.append("--set")
    return out


def _train_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="sparseham train", description=_TRAIN_DOC.split("\n\n")[0],
                       formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="YAML config file, or a shipped config's name (sparseham configs)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config keys, values parsed as YAML (--set a=1 b=2; repeatable)")
    p.add_argument("--out", help="run directory (default: <experiment.out_dir>/<experiment.name>)")
    p.add_argument("--force", action="store_true",
                   help="move a different run found in --out aside and start anew")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--help-config", action="store_true",
                   help="list every config key with its default and help")
    return p


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # Library warnings (RigL that never updates, a direct optimizer step) read like the run's own
    # warnings: one line on stdout, so stderr stays for the one-line errors.
    print(f"warning: {message}", flush=True)


def _thread_error(args: threading.ExceptHookArgs) -> None:
    # TensorBoard writes from its own thread; a full disk there is one warning line, not a
    # traceback. The run goes on (metrics.jsonl is written by the main thread, which reports a
    # full disk itself as the one-line error).
    if issubclass(args.exc_type, OSError):
        error = args.exc_value
        print(f"warning: a background writer stopped ({getattr(error, 'strerror', None) or error}): "
              "TensorBoard's event file ends here", flush=True)
        return
    threading.__excepthook__(args)


def train_main(argv: Sequence[str] | None = None) -> int:
    """``sparseham train``; returns the exit status."""
    warnings.showwarning = _one_line_warning
    threading.excepthook = _thread_error
    from sparseham.config import ConfigError, dump_config, help_text, load_config
    from sparseham.data import DataError
    from sparseham.masks import MaskInvariantError
    from sparseham.train import SetupError
    from sparseham.train.checkpoint import CheckpointError

    parser = _train_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(_set_values(argv, set(parser._option_string_actions)))
    except SystemExit as stop:  # --help (0) or a usage error (2, one line already printed)
        return int(stop.code or 0)
    if args.help_config:
        print(help_text())
        return 0
    if not args.config:
        print("sparseham train: error: --config FILE|NAME is required (try --config default; "
              "sparseham configs lists the shipped ones)", file=sys.stderr)
        return 2
    out = None
    try:
        cfg = load_config(args.config, args.set)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        from sparseham.train import run

        out = Path(args.out) if args.out else Path(cfg.experiment.out_dir) / cfg.experiment.name
        return run(cfg, out, force=args.force)
    except (ConfigError, DataError, SetupError) as e:  # bad input; an error during training is a bug
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, MaskInvariantError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the run directory is full or cannot be written (logs, config.yaml, final.json)
        print(
            f"error: {e.filename or out}: {e.strerror or e}; check free disk space and that the run "
            "directory is writable, then re-run the same command to resume",
            file=sys.stderr,
        )
        return 1


def _configs_main(argv: Sequence[str]) -> int:
    from sparseham.config import shipped_configs
    from sparseham.config.shipped import shipped_dir

    parser = argparse.ArgumentParser(prog="sparseham configs", description="List the shipped configs.")
    parser.parse_args(argv)
    print(f"# in {shipped_dir()}; use as --config NAME")
    print("\n".join(shipped_configs()))
    return 0


def _usage() -> str:
    width = max(map(len, _COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in _COMMANDS.items()]
    return ("usage: sparseham COMMAND [ARGS ...]\n\ncommands:\n" + "\n".join(lines)
            + "\n\nsparseham COMMAND --help describes each one.")


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``sparseham COMMAND ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from sparseham import __version__

        print(f"sparseham {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in _COMMANDS:
        from sparseham.method import suggest

        print(f"sparseham: unknown command {command!r}{suggest(command, list(_COMMANDS))}; "
              f"choose one of {', '.join(_COMMANDS)}", file=sys.stderr)
        return 2
    try:
        if command == "train":
            return train_main(rest)
        if command == "configs":
            return _configs_main(rest)
        return importlib.import_module(_COMMANDS[command][0]).main(rest)
    except BrokenPipeError:  # `sparseham ... | head`: the reader left; exit as a SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:  # Ctrl-C before training installed its own handler
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
