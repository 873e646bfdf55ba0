"""Grid sweeps of training runs: ``sparseham sweep SWEEP [--launcher local|submitit] [--jobs N]
[--dry-run] [--csv FILE] [--submitit.KEY VALUE ...]``.

SWEEP.yaml::

    config: ../default.yaml        # base config, relative to the sweep file (required)
    out: runs/studies/small        # output root, relative to the current directory (required)
    set: {train.max_steps: 200}    # overrides for every run (optional)
    grid:                          # dotted key -> list of values (required), or a list of
      sparsity.method: [static, rigl]   # such mappings whose cells are united
      ham.enabled: [false, true]
      experiment.seed: [0, 1, 2]
    launcher:                      # how the cells run (optional; default name: local)
      name: submitit               # local, or submitit: one submitit job per cell
      cluster: slurm               # submitit options (analysis/launchers.py): cluster, partition,
      partition: gpu               # time (minutes), gpus, cpus, mem (GB), array_parallelism;
      time: 120                    # --launcher and --submitit.KEY win over these
      gpus: 1

SWEEP is a file or the name of a shipped sweep (``studies/tune``). Each cell runs
``python -m sparseham train --config CONFIG --set k=v ... --out OUT/NAME`` in the current
directory (values as YAML scalars: ``true``, ``null``, ``0.001``), one at a time or
``--jobs N`` at once (``--launcher submitit``: as submitit jobs, their files under
``OUT/submitit/``), its output appended to ``OUT/logs/NAME.log``. NAME joins the keys that
vary between cells (last component, lengthened where two share it) and their values, e.g.
``method=rigl_enabled=true_seed=0``; clashes get ``-2``, ``-3``. Cells with a final.json are
skipped, so re-running resumes a sweep; a failed run is reported and the sweep goes on. At
the end ``OUT/results.md`` and ``OUT/results.csv`` hold one row per cell over every finished
run under OUT, seeds collapsed: mean ± std (ddof=1) and n of test_acc, val_acc (if logged),
sparsity, total flips, ever_flipped_frac and wall_time_s.

Exit status: 0; 1 when a run failed; 2 for a bad sweep file or launcher option, or jobs that
submitit cannot take (one line on stderr).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sparseham.analysis import cells, launchers, results, runs
from sparseham.config import ConfigError, config_to_dict, load_config
from sparseham.config.fields import show
from sparseham.config.shipped import resolve_config
from sparseham.config.strict_yaml import load_yaml
from sparseham.train.final import final_problem

__all__ = [
    "Cell", "Sweep", "SweepError", "cell_names", "expand", "load_sweep",
    "main", "plan", "run_sweep", "train_command",
]

MAX_CELLS = 20_000


class SweepError(ValueError):
    """A bad sweep file or argument; the message is one line naming the file."""


@dataclass(frozen=True)
class Cell:
    """One run of a sweep; ``overrides`` is the sweep's ``set`` updated by the cell's grid."""

    name: str
    config: Path
    overrides: dict
    run_dir: Path

    @property
    def log(self) -> Path:
        """Where the run's stdout and stderr go."""
        return self.run_dir.parent / "logs" / f"{self.name}.log"


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file: its path, output root, cells and validated ``launcher`` mapping."""

    path: Path
    out: Path
    cells: list[Cell]
    launcher: dict = field(default_factory=dict)


def _read_spec(path: Path) -> dict:
    try:
        spec = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SweepError(f"{path}: not a sweep file (not UTF-8 text)") from None
    except (OSError, yaml.YAMLError, ValueError, RecursionError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SweepError(f"{path}: cannot read the sweep file ({reason})") from None
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: expected a mapping of config, out, grid, got {spec!r:.40}")
    for key in spec:
        if key not in ("config", "out", "set", "grid", "launcher"):
            raise SweepError(f"{path}: unknown key '{key}'; allowed: config, out, set, grid, launcher")
    for key in ("config", "out", "grid"):
        if spec.get(key) in (None, "", [], {}):
            raise SweepError(f"{path}: missing key '{key}' (required: config, out, grid)")
    if not isinstance(spec.get("set") or {}, dict):
        raise SweepError(f"{path}: 'set' must map dotted keys to values, got {show(spec['set'])}")
    for key in ("config", "out"):
        if not isinstance(spec[key], str):
            raise SweepError(f"{path}: '{key}' must be one path, got {show(spec[key])}")
    return spec


def _check_grid(path: Path, grid: object) -> dict:
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f"{path}: 'grid' must map dotted keys to lists of values "
                         f"(or be a list of such mappings); got {grid!r}")
    for key, values in grid.items():
        if not isinstance(key, str) or not key.strip() or not all(key.split(".")):
            raise SweepError(f"{path}: grid key {show(key)} is not a dotted config key like ham.alpha")
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid value of '{key}' must be a non-empty list, "
                             f"got {values!r}; write [{values}] for a single value")
    return grid


def load_sweep(path: Path | str) -> Sweep:
    """Parses and validates a sweep file (format in the module docstring).

    Raises:
        SweepError: unreadable YAML, a missing or unknown key, a bad grid or no base config.
    """
    path = resolve_config(path)
    spec = _read_spec(path)
    config = (path.parent / str(spec["config"])).resolve()
    if not config.is_file():
        raise SweepError(f"{path}: config '{spec['config']}' not found (looked at {config})")
    raw = spec["grid"] if isinstance(spec["grid"], list) else [spec["grid"]]
    grids = [_check_grid(path, g) for g in raw]
    size = sum(math.prod(len(v) for v in g.values()) for g in grids)
    if size > MAX_CELLS:
        raise SweepError(f"{path}: the grid has {size:,} cells, more than {MAX_CELLS:,}; split the sweep")
    try:
        launcher = launchers.parse_block(spec["launcher"]) if "launcher" in spec else {}
    except launchers.LauncherError as err:
        raise SweepError(f"{path}: {err}") from None
    combos = expand(grids)
    out = Path(str(spec["out"])).resolve()
    fixed = spec.get("set") or {}
    cells = [Cell(name, config, {**fixed, **combo}, out / name)
             for name, combo in zip(cell_names(combos), combos)]
    return Sweep(path, out, cells, launcher)


def expand(grids: Sequence[dict]) -> list[dict]:
    """The cells ``{dotted key: value}`` of the union of ``grids`` (each the product of its
    lists, the last key varying fastest), in grid order, duplicates dropped."""
    cells, seen = [], set()
    for grid in grids:
        for values in itertools.product(*grid.values()):
            cell = dict(zip(grid, values))
            tag = json.dumps(cell, sort_keys=True, default=str)
            if tag not in seen:
                seen.add(tag)
                cells.append(cell)
    return cells


def cell_names(cells: Sequence[dict]) -> list[str]:
    """Readable, filesystem-safe, unique directory names for ``cells``, naming only the keys
    whose value differs between cells (a single cell is ``run``)."""
    keys = dict.fromkeys(k for cell in cells for k in cell)
    vary = [k for k in keys if len({runs.value_text(c[k]) if k in c else None for c in cells}) > 1]
    short = runs.short_keys(vary)
    names = []
    for cell in cells:
        raw = "_".join(f"{short[k]}={runs.value_text(cell[k])}" for k in vary if k in cell)
        names.append(re.sub(r"[^A-Za-z0-9._=+-]+", "-", raw).strip(".-")[:120] or "run")
    used: set[str] = set()
    unique = []
    for name in names:
        candidate, n = name, 1
        # Compare case-insensitively: macOS and Windows file systems do.
        while candidate.lower() in used:
            n += 1
            candidate = f"{name}-{n}"
        used.add(candidate.lower())
        unique.append(candidate)
    return unique


def train_command(cell: Cell) -> list[str]:
    """The default command of a cell: ``python -m sparseham train --config ... --set ... --out ...``."""
    sets = [a for s in _sets(cell) for a in ("--set", s)]
    return [sys.executable, "-m", "sparseham", "train", "--config", str(cell.config), *sets, "--out",
            str(cell.run_dir)]


def plan(sweep: Sweep) -> tuple[list[Cell], list[Cell]]:
    """Splits the cells into those to run and those finished (a damaged final.json runs again)."""
    done = [c for c in sweep.cells if (c.run_dir / "final.json").is_file()
            and final_problem(c.run_dir / "final.json") is None]
    return [c for c in sweep.cells if c not in done], done


def _run_all(todo: list[Cell], command: Callable[[Cell], list[str]], launch: launchers.Launch,
             on_done: Callable[[Cell], None] = lambda cell: None) -> list[str]:
    """Runs ``todo`` with ``launch``, printing a line per finished cell and calling ``on_done``
    after each success; returns a line per failed run. Launchers differ only in how a command
    runs, so every launcher reports, records and fails alike."""
    failed = []
    for count, (cell, code) in enumerate(launch(todo, command), 1):
        detail = f"exit code {code}" if isinstance(code, int) else code
        status = "ok" if code == 0 else f"FAILED with {detail}, log: {cell.log}"
        print(f"[{count}/{len(todo)}] {cell.name}: {status}", flush=True)
        failed += [f"{cell.name}: {status}"] if code != 0 else []
        if code == 0:
            on_done(cell)
    return failed


def _sets(cell: Cell) -> list[str]:
    return [f"{k}={runs.value_text(v)}" for k, v in cell.overrides.items()]


def run_sweep(path: Path | str, jobs: int = 1, dry_run: bool = False,
              command: Callable[[Cell], list[str]] | None = None, csv_path: Path | None = None,
              launcher: str | None = None, submitit: dict | None = None) -> int:
    """Runs the unfinished cells of a sweep, then writes the results tables.

    Args:
        path: the sweep file.
        jobs: runs at a time (local launcher).
        dry_run: only print what would run.
        command: builds a cell's argv, run in the current directory (default train_command).
        csv_path: a cells CSV: cells it holds are skipped, finished cells are appended to it.
        launcher: ``local`` or ``submitit``; default the sweep file's ``launcher.name``, else local.
        submitit: submitit options (``launchers.SUBMITIT_OPTIONS``) over the sweep file's.

    Returns:
        0, or 1 when a run failed.

    Raises:
        SweepError: a bad sweep file or ``jobs`` < 1.
        LauncherError: a bad launcher or option, or jobs that submitit could not take.
    """
    if jobs < 1:
        raise SweepError(f"--jobs must be at least 1, got {jobs}")
    sweep, command = load_sweep(path), command or train_command
    launch = launchers.choose(sweep.launcher, launcher, jobs, submitit or {}, sweep.out / "submitit",
                              f"sweep-{sweep.path.stem}")
    todo, skipped = plan(sweep)
    ledger = None
    if csv_path:
        configs = {c.name: config_to_dict(load_config(c.config, _sets(c))) for c in sweep.cells}
        ledger = cells.Ledger(Path(csv_path), configs)
    if ledger is not None:
        for cell in skipped:  # finished here before, but not yet in the CSV
            if not ledger.holds(cell.name) and not dry_run:
                ledger.record(cell.name, cell.run_dir)
        skipped += [c for c in todo if ledger.holds(c.name)]
        todo = [c for c in todo if not ledger.holds(c.name)]
    where = f"final.json exists{' or in ' + str(csv_path) if csv_path else ''}"
    print(f"{sweep.path}: {len(sweep.cells)} cells, {len(todo)} to run, {len(skipped)} skipped ({where})")
    if dry_run:
        print("\n".join(shlex.join(command(cell)) for cell in todo))
        return 0
    on_done = (lambda cell: ledger.record(cell.name, cell.run_dir)) if ledger else (lambda cell: None)
    failed = _run_all(todo, command, launch, on_done)
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    md, table = results.aggregate(sweep.out)
    print(f"results: {md} and {table}")
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseham sweep",
                                     description="Run a grid of training runs and tabulate them.")
    parser.add_argument("sweep", help="the sweep file or a shipped sweep's name (format: module docstring)")
    parser.add_argument("--jobs", type=int, default=1, help="local launcher: runs at a time (default 1); "
                        "submitit runs each cell as its own job, so the cluster (and, on Slurm, "
                        "--submitit.array-parallelism) decides how many run at once")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--csv", type=Path, help="a committed cells CSV: skip the cells it holds, "
                        "append a row per finished cell")
    launchers.add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return run_sweep(args.sweep, jobs=args.jobs, dry_run=args.dry_run, csv_path=args.csv,
                         launcher=args.launcher, submitit=launchers.cli_options(args))
    except (SweepError, launchers.LauncherError, ConfigError) as err:
        print(f"sparseham sweep: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
