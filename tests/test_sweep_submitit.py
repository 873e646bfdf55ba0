"""Tests for ``sparseham sweep --launcher submitit`` (analysis/launchers.py): real submitit with its
local executor (no Slurm here), against the local launcher on the same tiny real training runs."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from pathlib import Path

import pytest
import yaml

from sparseham.analysis import cells, sweep

__all__: list[str] = []

pytest.importorskip("submitit")

ROOT = Path(__file__).resolve().parents[1]
# Seconds per run on a busy CPU. The device is pinned: submitit's local executor hides the GPUs
# from a job that asks for none, so "auto" would train on different devices per launcher.
TINY = {"data.dataset": "synthetic", "model.name": "lenet300", "data.batch_size": 64,
        "train.max_steps": 5, "train.device": "cpu", "logging.tensorboard": False}
SUBMITIT = ["--launcher", "submitit", "--submitit.cluster", "local", "--submitit.time", "5"]


def _write_sweep(root: Path, name: str, grid: dict, **spec) -> Path:
    shutil.copy(ROOT / "configs" / "default.yaml", root / "default.yaml")
    path = root / f"{name}.yaml"
    body = {"config": "default.yaml", "out": str(root / name), "set": TINY, "grid": grid, **spec}
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _sweep(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = sweep.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _table(md: Path) -> list[list[str]]:
    """results.md without its wall-time column, the only one that depends on timing."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.read_text().splitlines()]
    wall = [i for i, c in enumerate(rows[0]) if c.startswith("wall_time_s")]
    assert wall, rows[0]
    return [[c for i, c in enumerate(row) if i not in wall] for row in rows]


@pytest.fixture(scope="module")
def two_launchers(tmp_path_factory):
    """The same 2-cell sweep run once by each launcher, into its own output root."""
    root = tmp_path_factory.mktemp("sweeps")
    grid = {"ham.enabled": [False, True]}
    local, remote = _write_sweep(root, "local", grid), _write_sweep(root, "submitit", grid)
    ledger = root / "cells.csv"
    return {"root": root, "path": remote, "ledger": ledger, "local": _sweep(local, "--jobs", "2"),
            "submitit": _sweep(remote, *SUBMITIT, "--csv", ledger)}


def test_submitit_local_runs_the_cells_like_the_local_launcher(two_launchers):
    root = two_launchers["root"]
    assert two_launchers["local"][0] == 0, two_launchers["local"]
    code, out, err = two_launchers["submitit"]
    assert code == 0, (out, err)
    assert "2 cells, 2 to run, 0 skipped" in out
    assert re.search(r"submitit: 2 jobs on local \(\d+ \.\.\.\), files under .*submitit", out)
    assert out.count(": ok") == 2
    for name in ("enabled=false", "enabled=true"):
        assert (root / "submitit" / name / "final.json").is_file()
        log = (root / "submitit" / "logs" / f"{name}.log").read_text()
        assert log.startswith("$ ") and f"--out {root / 'submitit' / name}" in log
    assert list((root / "submitit" / "submitit").glob("*_0_log.out"))  # submitit's own logs
    table = _table(root / "submitit" / "results.md")
    assert [row[:2] for row in table[2:]] == [["ham.enabled=false", "1"], ["ham.enabled=true", "1"]]
    assert table == _table(root / "local" / "results.md")
    assert sorted(r["cell"] for r in cells.read_rows(two_launchers["ledger"])) == ["enabled=false",
                                                                                  "enabled=true"]


def test_submitit_rerun_resumes_and_submits_nothing(two_launchers):
    jobs = sorted((two_launchers["root"] / "submitit" / "submitit").iterdir())
    code, out, err = _sweep(two_launchers["path"], *SUBMITIT, "--csv", two_launchers["ledger"])
    assert (code, err) == (0, "")
    assert "2 cells, 0 to run, 2 skipped" in out and "submitit:" not in out
    assert sorted((two_launchers["root"] / "submitit" / "submitit").iterdir()) == jobs


def test_a_failing_cell_exits_1_with_the_same_failure_line(tmp_path):
    # optim.lr = -1 fails in train's config check (exit 2), before any training.
    grid = {"optim.lr": [-1.0]}
    local, remote = _write_sweep(tmp_path, "local", grid), _write_sweep(tmp_path, "submitit", grid)
    results = {"local": _sweep(local), "submitit": _sweep(remote, *SUBMITIT)}
    lines = {}
    for name, (code, out, err) in results.items():
        log = tmp_path / name / "logs" / "run.log"
        assert code == 1, (out, err)
        assert f"[1/1] run: FAILED with exit code 2, log: {log}" in out
        assert err == f"failed: run: FAILED with exit code 2, log: {log}\n"
        assert "optim.lr" in log.read_text()
        lines[name] = err.replace(str(tmp_path / name), "OUT")
    assert lines["local"] == lines["submitit"]
    assert (tmp_path / "submitit" / "results.md").is_file()


@pytest.mark.parametrize("argv, launcher, message", [
    (["--submitit.cluster", "slurmm"], None, "--submitit.cluster must be one of local, slurm, debug, "
                                             "got 'slurmm'"),
    (["--submitit.time", "1.5"], None, "--submitit.time must be whole minutes, at least 1, got '1.5'"),
    (["--submitit.mem", "lots"], None, "--submitit.mem must be gigabytes, a number above 0, got 'lots'"),
    (["--jobs", "2"], None, "--jobs 2 applies to --launcher local only: submitit runs each cell as its "
                            "own job (on Slurm, limit them with --submitit.array-parallelism)"),
    (["--launcher", "slurm"], None, "--launcher must be local or submitit, got 'slurm'"),
    (["--launcher", "local", "--submitit.gpus", "1"], None,
     "--submitit.gpus applies to --launcher submitit only, and the launcher is local"),
    ([], {"name": "submitit", "partion": "gpu"}, "{path}: unknown key 'launcher.partion'; did you mean "
     "'launcher.partition'? allowed: name, cluster, partition, time, gpus, cpus, mem, array_parallelism"),
    ([], {"name": "submitit", "gpus": -1}, "{path}: launcher.gpus must be a whole number of GPUs per "
                                           "job, at least 0, got -1"),
    ([], {"name": "slurm"}, "{path}: launcher.name must be local or submitit, got 'slurm'"),
    ([], "slurm", "{path}: 'launcher' must be a mapping like {{name: submitit, cluster: slurm}}, got "
                  "'slurm'"),
])
def test_a_bad_launcher_option_exits_2_with_one_line(tmp_path, argv, launcher, message):
    spec = {"launcher": launcher} if launcher is not None else {}
    path = _write_sweep(tmp_path, "s", {"ham.enabled": [False, True]}, **spec)
    launcher_flags = [] if "--launcher" in argv or launcher else ["--launcher", "submitit"]
    code, out, err = _sweep(path, *launcher_flags, *argv)
    assert code == 2
    assert err == f"sparseham sweep: {message.format(path=path)}\n"
    assert not (tmp_path / "s").exists()  # nothing ran, nothing was submitted


def test_the_sweep_file_launcher_block_is_used_and_flags_win(tmp_path):
    block = {"name": "submitit", "cluster": "slurm", "partition": "gpu", "time": 120, "gpus": 1}
    path = _write_sweep(tmp_path, "s", {"optim.lr": [-1.0]}, launcher=block)
    assert sweep.load_sweep(path).launcher == block
    # --dry-run checks the options but submits nothing, so it works without Slurm.
    assert _sweep(path, "--dry-run", "--submitit.time", "30")[::2] == (0, "")
    assert _sweep(path, "--launcher", "local", "--dry-run")[::2] == (0, "")
    # No Slurm here: only because the flag wins does the cell run (in submitit's debug executor).
    code, out, err = _sweep(path, "--submitit.cluster", "debug", "--submitit.gpus", "0")
    assert code == 1 and "1 jobs on debug" in out and "FAILED with exit code 2" in err


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """A fake ``sbatch`` that keeps the job script it is given and refuses it (so nothing waits
    for a job), and a fake ``srun``, on PATH: submitit takes the Slurm path and writes its script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path / "job.sh"}\n'
                                    'echo "sbatch: error: fake sbatch" >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    return tmp_path / "job.sh"


def _run_script(script: Path) -> None:
    """Runs the generated job script as Slurm would (with the fake srun) and checks it ran."""
    import subprocess
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done


INJECTED = "gpu\ntouch {marker}"


@pytest.mark.parametrize("where, value", [
    ("flag", INJECTED), ("file", INJECTED), ("file", "gpu;touch {marker}"),
    ("flag", "gpu$(touch {marker})"), ("file", "gpu`touch {marker}`"), ("flag", "gpu' 'x"),
    ("file", "gpu\r"), ("flag", " gpu"), ("file", ""), ("file", 7),
])
def test_a_partition_with_shell_syntax_exits_2_before_any_script(tmp_path, fake_slurm, where, value):
    marker = tmp_path / "PWNED"
    value = value.format(marker=marker) if isinstance(value, str) else value
    block = {"name": "submitit", "cluster": "slurm"} | ({"partition": value} if where == "file" else {})
    path = _write_sweep(tmp_path, "s", {"ham.enabled": [False]}, launcher=block)
    flags = ["--submitit.partition", value] if where == "flag" else []
    code, out, err = _sweep(path, *flags)
    name = "--submitit.partition" if where == "flag" else f"{path}: launcher.partition"
    assert (code, out) == (2, "")
    assert err.startswith(f"sparseham sweep: {name} must be a Slurm partition name: letters, digits, "
                          "'_', '-', '.', and ',' between names, got ")
    assert err.count("\n") == 1
    assert not fake_slurm.exists() and not marker.exists()  # nothing reached sbatch


def test_an_out_directory_with_a_newline_exits_2_before_any_script(tmp_path, fake_slurm):
    marker = tmp_path / "PWNED"
    path = _write_sweep(tmp_path, "s", {"ham.enabled": [False]},
                        launcher={"name": "submitit", "cluster": "slurm"})
    spec = yaml.safe_load(path.read_text())
    spec["out"] = f"{tmp_path}/runs\ntouch {marker}\n#"
    path.write_text(yaml.safe_dump(spec))
    code, out, err = _sweep(path)
    assert (code, out) == (2, "")
    assert re.fullmatch(r"sparseham sweep: the sweep's output directory '.*' holds a control character, "
                        r"which the Slurm job script cannot carry safely; use a path without one\n", err)
    assert not fake_slurm.exists() and not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "default.yaml", "s.yaml"]


def test_the_job_script_holds_only_its_own_lines(tmp_path, fake_slurm):
    """Allowed values reach the script as they are, a sweep file's odd name becomes a plain job
    name, and running the script runs nothing but srun."""
    marker = tmp_path / "PWNED"
    path = _write_sweep(tmp_path, "s", {"ham.enabled": [False]},
                        launcher={"name": "submitit", "cluster": "slurm", "partition": "gpu,gpu-long.2_a"})
    odd = path.with_name(f"s $(touch {marker.name});`x`'.yaml")
    path.rename(odd)
    code, out, err = _sweep(odd, "--submitit.time", "30")
    assert code == 2 and err.endswith("sbatch: error: fake sbatch\n"), (out, err)  # the fake refuses
    lines = fake_slurm.read_text().splitlines()
    assert "#SBATCH --partition=gpu,gpu-long.2_a" in lines
    assert "#SBATCH --job-name=sweep-s-touch-PWNED-x" in lines
    assert "#SBATCH --time=30" in lines
    commands = [line for line in lines if line and not line.startswith("#")]
    assert commands == ["export SUBMITIT_EXECUTOR=slurm", *[c for c in commands if c.startswith("srun ")]]
    assert len(commands) == 2
    _run_script(fake_slurm)
    assert not marker.exists()
