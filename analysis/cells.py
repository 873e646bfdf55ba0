"""Finished study cells as rows of a CSV that is committed, so a study survives a new machine.

``runs/`` is not committed; a row here is. ``sparseham sweep SWEEP --csv FILE`` skips every cell
already in FILE and appends one row per cell it finishes. One CSV belongs to one sweep file, and a
cell is identified by its name in that sweep (``cell``: the grid values that vary, seed included),
so a study resumes on any machine and with newer code; ``commit`` says which code ran each row.
To re-run cells after changing what they mean (the sweep's base config, its ``set``), delete
their rows or start a new CSV. Each row holds:

- ``hash``: the first 12 hex digits of the SHA-256 of the resolved config, without the keys that
  do not change the result (``experiment.name``, ``experiment.out_dir``, ``logging``,
  ``checkpoint``), to tell apart rows whose configs differ;
- the key settings (dataset, model, method, init, distribution, target, HAM on/off, alpha, beta,
  clamp, lr, weight decay, epochs, seed);
- the results from ``final.json`` (test and validation accuracy, sparsity, total sign flips,
  HAM's clamped fraction and cap count, wall time);
- ``commit``: the git commit of the code that ran it.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "Ledger", "append_row", "config_hash", "read_rows", "row_for_run", "source_commit"]

_IGNORED = {("experiment", "name"), ("experiment", "out_dir"), ("logging",), ("checkpoint",)}
SETTINGS = {
    "dataset": ("data", "dataset"), "model": ("model", "name"), "method": ("sparsity", "method"),
    "init": ("sparsity", "init"), "distribution": ("sparsity", "distribution"),
    "target": ("sparsity", "target"), "ham": ("ham", "enabled"), "alpha": ("ham", "alpha"),
    "beta": ("ham", "beta"), "clamp": ("ham", "clamp"), "lr": ("optim", "lr"),
    "weight_decay": ("optim", "weight_decay"), "epochs": ("train", "epochs"),
    "seed": ("experiment", "seed"),
}
RESULTS = ["test_acc", "val_acc", "sparsity", "flips", "ham_clamped_fraction", "ham_capped", "wall_time_s"]
COLUMNS = ["hash", "cell", *SETTINGS, *RESULTS, "commit"]


def _without(config: dict, path: tuple = ()) -> dict:
    return {k: (_without(v, (*path, k)) if isinstance(v, dict) else v) for k, v in config.items()
            if (*path, k) not in _IGNORED}


def config_hash(config: dict) -> str:
    """The hash of a resolved config (``config_to_dict``) that names its cell."""
    text = json.dumps(_without(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _get(config: dict, path: tuple) -> Any:
    for key in path:
        config = config.get(key) if isinstance(config, dict) else None
    return config


def row_for_run(run_dir: Path, cell: str, config: dict, commit: str) -> dict[str, Any]:
    """The CSV row of a finished run: its settings from ``config``, its results from final.json."""
    final = json.loads((run_dir / "final.json").read_text())
    ham = final.get("ham") or {}
    row = {"hash": config_hash(config), "cell": cell}
    row.update({name: _get(config, path) for name, path in SETTINGS.items()})
    row["distribution"] = final.get("distribution") or row["distribution"]  # null: what the method used
    row.update({
        "test_acc": final.get("test_acc"), "val_acc": final.get("val_acc"),
        "sparsity": final.get("sparsity"),
        "flips": (final.get("flips_masked") or 0) + (final.get("flips_unmasked") or 0),
        "ham_clamped_fraction": ham.get("clamped_fraction"), "ham_capped": ham.get("capped"),
        "wall_time_s": final.get("wall_time_s"), "commit": commit,
    })
    return row


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a cells CSV (``[]`` when it does not exist)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` under an exclusive lock (several sweeps may share one CSV); writes the
    header first when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if f.tell() == 0:
            writer.writeheader()
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
        f.flush()


def source_commit() -> str:
    """The git commit of the running code (``+dirty`` with uncommitted changes), or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=10", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


class Ledger:
    """A sweep's cells CSV: which cells it holds, and a row appended for each cell that finishes.

    Args:
        path: the CSV.
        configs: cell name -> its resolved config (``config_to_dict``).
    """

    def __init__(self, path: Path, configs: dict[str, dict]) -> None:
        self.path, self.configs, self.commit = path, configs, source_commit()
        self.have = {row["cell"] for row in read_rows(path)}

    def holds(self, name: str) -> bool:
        return name in self.have

    def record(self, name: str, run_dir: Path) -> None:
        append_row(self.path, row_for_run(run_dir, name, self.configs[name], self.commit))
        self.have.add(name)
