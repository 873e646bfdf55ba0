"""Train a sparse model from a YAML config.

    python train.py --config configs/default.yaml [--set key=value ...] [--out DIR]

Re-running the same command on the same directory resumes from its last checkpoint; a finished
run says so and exits 0. Bad configs and data problems exit with status 2 and one line on stderr;
a non-finite loss (``train.on_nonfinite: stop``), an unreadable or unwritable checkpoint, a full or
unwritable run directory and a broken mask invariant exit with status 1 and one line. SIGTERM and
SIGINT write a checkpoint and exit with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import methods  # noqa: F401  (registers the built-in methods)
from sparseham.checkpoint import CheckpointError
from sparseham.config import help_text, load_config
from sparseham.config_types import ConfigError
from sparseham.data import DataError
from sparseham.masks import MaskInvariantError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, the value parsed as YAML (repeatable)",
    )
    p.add_argument("--out", help="run directory (default: <experiment.out_dir>/<experiment.name>)")
    p.add_argument(
        "--force", action="store_true", help="move a different run found in --out aside and start anew"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--help-config", action="store_true", help="list every config key with its default and help"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print(help_text())
        return 0
    if not args.config:
        print("train.py: error: --config FILE is required (try configs/default.yaml)", file=sys.stderr)
        return 2
    from sparseham.config import dump_config
    from sparseham.trainer import run

    out = None
    try:
        cfg = load_config(args.config, args.set)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        out = Path(args.out) if args.out else Path(cfg.experiment.out_dir) / cfg.experiment.name
        return run(cfg, out, force=args.force)
    except (ConfigError, DataError, ValueError) as e:
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


if __name__ == "__main__":
    sys.exit(main())
