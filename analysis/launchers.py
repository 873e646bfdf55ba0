"""How a sweep's cells run: ``local`` (subprocesses on this machine, ``--jobs`` at a time) or
``submitit`` (one submitit job per cell: a Slurm array job, or submitit's local or debug executor).

A launcher only executes commands. Both run a cell's argv through ``run_command`` in the directory
the sweep was started from, appending its output to the cell's log, and yield ``(cell, result)``
as cells finish: the exit status, or a line saying why a submitit job gave none (timed out,
cancelled, node lost). Everything else (which cells run, the CSV ledger, the failure lines, the
results tables) is the sweep's and shared (``analysis/sweep.py``).

Submitit options, from a sweep file's ``launcher:`` mapping or ``--submitit.KEY`` (which wins):
``cluster`` (local, slurm, debug; default submitit's choice: slurm where ``srun`` exists, else
local), ``partition``, ``time`` (minutes per job, default 240), ``gpus`` (per job), ``cpus`` (per
task), ``mem`` (GB) and ``array_parallelism`` (Slurm: cells running at once).

Values that reach the generated Slurm script cannot carry shell syntax: a partition (and any
other Slurm name) is letters, digits, ``_``, ``-`` and ``.``, with ``,`` between the names of a
list of partitions (``gpu,gpu-long``); the job name is ``sweep-`` plus the sweep file's name with
every other character turned into ``-``; the sweep's ``out`` directory and the Python executable
(which the script names) must hold no control character (newline, tab, ...). Anything else exits
2 with one line, before submitit writes a file. The reason: submitit writes each value into a
``#SBATCH`` comment line, and a newline in it starts a command of the job script.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from sparseham.config.fields import show

if TYPE_CHECKING:
    from sparseham.analysis.sweep import Cell

__all__ = ["CLUSTERS", "DEFAULT_TIME_MIN", "LAUNCHERS", "SUBMITIT_OPTIONS", "Launch", "LauncherError",
           "add_arguments", "choose", "cli_options", "local_launcher", "parse_block", "run_command",
           "submitit_launcher"]

LAUNCHERS = ("local", "submitit")
CLUSTERS = ("local", "slurm", "debug")
# submitit's own defaults (2 min locally, 5 on Slurm) would kill almost any training run.
DEFAULT_TIME_MIN = 240
POLL_S = 1.0

Command = Callable[["Cell"], list[str]]
Outcomes = Iterator[tuple["Cell", "int | str"]]  # exit status, or why a job gave none
Launch = Callable[["Sequence[Cell]", Command], Outcomes]


class LauncherError(ValueError):
    """A bad launcher option, or submitit could not take the jobs; the message is one line."""


def _cluster(value: Any) -> str | None:
    return value if value in CLUSTERS else None


# What Slurm accepts in a partition, account or QoS name, and nothing that a shell or an #SBATCH
# line reads as syntax (quotes, newlines, $, ;, spaces). A comma separates a list of partitions.
_SLURM_NAME = re.compile(r"[A-Za-z0-9_.-]+(?:,[A-Za-z0-9_.-]+)*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _slurm_name(value: Any) -> str | None:
    return value if isinstance(value, str) and _SLURM_NAME.fullmatch(value) else None


def _whole(low: int) -> Callable[[Any], int | None]:
    def parse(value: Any) -> int | None:
        if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
            value = int(value)
        return value if type(value) is int and value >= low else None
    return parse


def _gigabytes(value: Any) -> float | None:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if 0 < value < float("inf") else None


class _Option(NamedTuple):
    param: str  # submitit's name for it
    parse: Callable[[Any], Any]  # the value, or None for a bad one
    expected: str
    metavar: str
    help: str


SUBMITIT_OPTIONS = {
    "cluster": _Option("cluster", _cluster, "one of " + ", ".join(CLUSTERS), "|".join(CLUSTERS),
                       "local, slurm or debug (default: slurm where srun exists, else local; local "
                       "starts every cell at once, and a job sees --submitit.gpus GPUs, none if unset)"),
    "partition": _Option("slurm_partition", _slurm_name, "a Slurm partition name: letters, digits, '_', "
                         "'-', '.', and ',' between names", "NAME", "Slurm partition"),
    "time": _Option("timeout_min", _whole(1), "whole minutes, at least 1", "MIN",
                    f"minutes per job (default {DEFAULT_TIME_MIN}); the job is killed after it"),
    "gpus": _Option("gpus_per_node", _whole(0), "a whole number of GPUs per job, at least 0", "N",
                    "GPUs per job"),
    "cpus": _Option("cpus_per_task", _whole(1), "a whole number of CPUs per task, at least 1", "N",
                    "CPUs per task"),
    "mem": _Option("mem_gb", _gigabytes, "gigabytes, a number above 0", "GB", "memory per job"),
    "array_parallelism": _Option("slurm_array_parallelism", _whole(1), "a whole number of jobs, at least 1",
                                 "N", "Slurm: at most this many cells run at once"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--launcher`` and the ``--submitit.*`` options (as strings: ``choose`` checks them,
    with the same one-line errors as for a sweep file)."""
    parser.add_argument("--launcher", metavar="local|submitit",
                        help="local (default, or the sweep file's launcher.name): subprocesses here; "
                        "submitit: one submitit job per cell")
    group = parser.add_argument_group("submitit launcher (over the sweep file's launcher: mapping)")
    for key, option in SUBMITIT_OPTIONS.items():
        group.add_argument(_flag(key, cli=True), dest=f"submitit_{key}", metavar=option.metavar,
                           help=option.help)


def cli_options(args: argparse.Namespace) -> dict:
    """The ``--submitit.*`` options that were given."""
    given = {key: getattr(args, f"submitit_{key}") for key in SUBMITIT_OPTIONS}
    return {key: value for key, value in given.items() if value is not None}


def _flag(key: str, cli: bool) -> str:
    return f"--submitit.{key.replace('_', '-')}" if cli else f"launcher.{key}"


def _parse_options(raw: dict, cli: bool) -> dict:
    options = {}
    for key, value in raw.items():
        if key not in SUBMITIT_OPTIONS:
            near = difflib.get_close_matches(str(key), SUBMITIT_OPTIONS, n=1)
            hint = f"did you mean '{_flag(near[0], cli)}'? " if near else ""
            raise LauncherError(f"unknown key '{_flag(str(key), cli)}'; {hint}allowed: name, "
                                + ", ".join(SUBMITIT_OPTIONS))
        options[key] = SUBMITIT_OPTIONS[key].parse(value)
        if options[key] is None:
            raise LauncherError(f"{_flag(key, cli)} must be {SUBMITIT_OPTIONS[key].expected}, "
                                f"got {show(value)}")
    return options


def parse_block(block: Any) -> dict:
    """Validates a sweep file's ``launcher:`` mapping: ``name`` (local or submitit) and submitit
    options, kept for ``--launcher submitit`` even where ``name`` is local.

    Raises:
        LauncherError: not a mapping, no or a bad name, an unknown key or a bad value.
    """
    if not isinstance(block, dict):
        raise LauncherError(f"'launcher' must be a mapping like {{name: submitit, cluster: slurm}}, "
                            f"got {show(block)}")
    if block.get("name") not in LAUNCHERS:
        raise LauncherError(f"launcher.name must be local or submitit, got {show(block.get('name'))}")
    return {"name": block["name"], **_parse_options({k: v for k, v in block.items() if k != "name"},
                                                    cli=False)}


def choose(block: dict, name: str | None, jobs: int, cli: dict, folder: Path, job_name: str) -> Launch:
    """The launcher a sweep runs with: ``name`` (``--launcher``) or the file's ``launcher.name``
    or local; submitit options are the file's updated by ``cli`` (``--submitit.*``, unset ones
    left out).

    Raises:
        LauncherError: a bad launcher name or option, or options that the launcher ignores.
    """
    name = name if name is not None else block.get("name", "local")
    if name not in LAUNCHERS:
        raise LauncherError(f"--launcher must be local or submitit, got {show(name)}")
    cli = _parse_options(cli, cli=True)
    if name == "local":
        if cli:
            raise LauncherError(f"{_flag(next(iter(cli)), True)} applies to --launcher submitit only, "
                                "and the launcher is local")
        return local_launcher(jobs)
    if jobs != 1:
        raise LauncherError(f"--jobs {jobs} applies to --launcher local only: submitit runs each cell as "
                            "its own job (on Slurm, limit them with --submitit.array-parallelism)")
    _import_submitit()
    options = {k: v for k, v in block.items() if k != "name"} | cli
    return submitit_launcher(options, _script_path(folder), _job_name(job_name))


def _script_path(folder: Path) -> Path:
    """``folder``, once it and the Python executable, both named in the job script, are known to
    hold no control character (a newline in an #SBATCH line starts a command)."""
    for what, text in (("the sweep's output directory", str(folder)), ("the Python executable",
                                                                      sys.executable)):
        if _CONTROL.search(text):
            raise LauncherError(f"{what} {show(text)} holds a control character, which the Slurm job "
                                "script cannot carry safely; use a path without one")
    return folder


def _job_name(name: str) -> str:
    """``name`` in the characters of a Slurm name: every other run of characters becomes ``-``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "sweep"


def run_command(argv: list[str], log: Path, cwd: Path) -> int:
    """Runs ``argv`` in ``cwd``, appending its output to ``log``; returns its exit status (127 when
    it cannot start). Both launchers run cells through this; submitit pickles it by reference, so
    a job imports this module, and so sparseham, wherever it runs.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"$ {shlex.join(argv)}\n")
        out.flush()
        try:
            return subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  cwd=cwd, check=False).returncode
        except OSError as err:
            out.write(f"cannot start the command: {err}\n")
            return 127


def local_launcher(jobs: int) -> Launch:
    """Runs the cells here, ``jobs`` subprocesses at a time."""
    def launch(todo: Sequence[Cell], command: Command) -> Outcomes:
        cwd = Path.cwd()
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(run_command, command(cell), cell.log, cwd): cell for cell in todo}
            for future in as_completed(futures):
                yield futures[future], future.result()
    return launch


def _import_submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise LauncherError("--launcher submitit needs the submitit package: "
                            "pip install 'sparseham[cluster]'") from None
    return submitit


def _executor(options: dict, folder: Path, job_name: str) -> Any:
    import submitit  # choose() checked that it is there

    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=options.get("cluster"))
    except RuntimeError as err:  # e.g. cluster slurm where there is no srun
        raise LauncherError(f"submitit cannot use cluster {options.get('cluster')}: {err} "
                            "(--submitit.cluster local runs the jobs here)") from None
    params = {SUBMITIT_OPTIONS[k].param: v for k, v in options.items() if k != "cluster"}
    executor.update_parameters(**{"name": job_name, "timeout_min": DEFAULT_TIME_MIN, **params})
    return executor


def _outcome(job: Any) -> int | str:
    error = job.exception()
    if error is None:
        return job.result()
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"no exit status from submitit job {job.job_id} ({reason}; its log: {job.paths.stderr})"


def submitit_launcher(options: dict, folder: Path, job_name: str) -> Launch:
    """Submits each cell as one job of a submitit array (its files under ``folder``) and yields
    the cells as their jobs finish."""
    def launch(todo: Sequence[Cell], command: Command) -> Outcomes:
        if not todo:
            return
        import submitit
        from submitit.core.utils import FailedSubmissionError, UncompletedJobError

        executor, cwd = _executor(options, folder, job_name), Path.cwd()
        try:
            jobs = executor.map_array(run_command, [command(c) for c in todo], [c.log for c in todo],
                                      [cwd] * len(todo))
        # sbatch's refusal (a bad partition, time or account) comes as a FailedJobError.
        except (OSError, subprocess.CalledProcessError, FailedSubmissionError, UncompletedJobError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise LauncherError(f"submitit could not submit the jobs to {executor.cluster}: "
                                f"{reason}") from None
        print(f"submitit: {len(jobs)} jobs on {executor.cluster} ({jobs[0].job_id} ...), "
              f"files under {folder}", flush=True)
        cells = {id(job): cell for job, cell in zip(jobs, todo)}
        # as_completed asks each job whether it is done; the debug executor runs the job then.
        finished = submitit.helpers.as_completed(jobs, poll_frequency=POLL_S)
        for job in finished:
            yield cells[id(job)], _outcome(job)
    return launch
