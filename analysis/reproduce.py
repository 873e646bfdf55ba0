"""Re-run cells of a committed study CSV and compare: ``sparseham study rerun CSV SWEEP``.

Picks ``--cells`` rows of the CSV at random (``--seed``), runs each cell again from the sweep file
with this checkout's code into a scratch directory (one thread, as the study ran: the CPU
kernels then reduce in the same order), and prints the stored and the new test accuracy.
Training on the CPU is deterministic, so they must be equal; exit status 1 when one is not,
which means the code changed what that row measured (its ``commit`` column says which code
wrote it).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from sparseham.analysis.cells import read_rows
from sparseham.analysis.sweep import load_sweep, train_command

__all__ = ["rerun"]


def rerun(csv_path: Path, sweep_path: Path | str, cells: int = 3, seed: int = 0,
          where: Callable[[dict], bool] | None = None) -> list[tuple[str, float, float]]:
    """Re-run ``cells`` random rows (those ``where`` admits); returns (cell, stored, new) each."""
    rows = [r for r in read_rows(csv_path) if where is None or where(r)]
    chosen = random.Random(seed).sample(rows, min(cells, len(rows)))
    sweep = {c.name: c for c in load_sweep(sweep_path).cells}
    out = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="sparseham-rerun-") as scratch:
        for row in chosen:
            cell = replace(sweep[row["cell"]], run_dir=Path(scratch) / row["cell"])
            proc = subprocess.run(train_command(cell) + ["--set", "logging.progress=false",
                                                         "--set", "logging.tensorboard=false"],
                                  capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"{row['cell']}: the run failed: {proc.stderr.strip()[-400:]}")
            final = json.loads((cell.run_dir / "final.json").read_text())
            out.append((row["cell"], float(row["test_acc"]), final["test_acc"]))
    return out
