"""The results tables of a sweep: ``OUT/results.md`` and ``OUT/results.csv``, one row per cell over
every finished run under OUT, seeds collapsed (mean ± std with ddof=1, and n)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from sparseham.analysis import runs

__all__ = ["RESULT_COLUMNS", "aggregate"]

RESULT_COLUMNS = [("test_acc", 4), ("val_acc", 4), ("sparsity", 4), ("total_flips", 0),
                  ("ever_flipped_frac", 4), ("wall_time_s", 1)]


def _write_tables(out_root: Path, names: list[str], groups: list[list[dict]]) -> tuple[Path, Path]:
    has_val = any(s.get("val_acc") is not None for g in groups for s in g)
    columns = [c for c in RESULT_COLUMNS if c[0] != "val_acc" or has_val]
    md = ["| cell | n | " + " | ".join(f"{key} (mean ± std)" for key, _ in columns) + " |",
          "|---|---|" + "---|" * len(columns)]
    rows = [["cell", "n", "runs"] + [f"{key}_{s}" for key, _ in columns for s in ("mean", "std")]]
    for name, stats in sorted(zip(names, groups), key=lambda item: item[0]):
        cells = [runs.fmt_stat([s.get(key) for s in stats], digits) for key, digits in columns]
        md.append(f"| {name} | {len(stats)} | " + " | ".join(cells) + " |")
        moments = [runs.mean_std(s.get(key) for s in stats)[:2] for key, _ in columns]
        rows.append([name, len(stats), " ".join(s["run"] for s in stats)]
                    + ["" if v != v else repr(v) for pair in moments for v in pair])
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "results.md").write_text("\n".join(md) + "\n")
    with (out_root / "results.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return out_root / "results.md", out_root / "results.csv"


def aggregate(out_root: Path | str) -> tuple[Path, Path]:
    """Writes ``results.md`` and ``results.csv`` for the runs under ``out_root`` that have a
    final.json; runs whose configs differ only by seed (or name, out_dir) share a row.

    Returns:
        The paths of results.md and results.csv.
    """
    out_root = Path(out_root)
    found = []
    for final in sorted(out_root.glob("*/final.json")):
        try:
            found.append(runs.load_run(final.parent, require_flips=False))
        except runs.RunError as err:
            print(f"skipped: {err}", file=sys.stderr)
    groups = runs.group_by_seed([run.config for run in found])
    single = found[0].path.name if len(found) == 1 else "all seeds"
    names = runs.group_labels([found[g[0]].config for g in groups], single)
    stats = [[{**runs.summary(found[j]), "run": found[j].path.name} for j in g] for g in groups]
    return _write_tables(out_root, names, stats)
