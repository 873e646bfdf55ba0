"""The small-scale study: pick HAM's alpha and beta on validation data, then tabulate and plot.

    sparseham study select runs/studies/tune            # best (alpha, beta) per method
    sparseham study table runs/studies/main --out docs   # results table + sign-flip figure

``select`` reads the tuning sweep (``configs/studies/tune.yaml``: a held-out 10% of the training
set, never the test set) and writes ``selection.md``/``selection.json`` next to the runs: per
method, the (alpha, beta) with the highest final validation accuracy, the whole grid searched, and
the baseline without HAM. ``table`` reads the main grid and writes ``study.md`` (mean ± std of test
accuracy over seeds per dataset × model × method × sparsity, with and without HAM, and the
difference) and ``flips_random_pai.png``: cumulative flips of random PaI at 90% with and without
HAM (the paper's Fig. 2a setting).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from sparseham.analysis.runs import RunError, load_run, mean_std  # noqa: E402

__all__ = ["method_key", "select", "table", "main"]


def method_key(config: dict) -> str:
    """``rigl``, ``acdc``, ... and ``static/snip`` for pruning at initialization."""
    sp = config["sparsity"]
    return f"static/{sp['init']}" if sp["method"] == "static" else sp["method"]


def _finished(root: Path) -> list:
    runs = []
    for d in sorted(f.parent for f in root.rglob("final.json")):  # sweeps may nest (one per data set)
        try:
            runs.append(load_run(d, require_flips=False))
        except RunError as e:
            print(f"skipping {d}: {e}", file=sys.stderr)
    return runs


def select(root: Path) -> dict:
    """Best (alpha, beta) per method by final validation accuracy; writes selection.{md,json}."""
    grid: dict[str, list[tuple[float | None, float | None, float]]] = defaultdict(list)
    for run in _finished(root):
        ham = run.config["ham"]
        key = (ham["alpha"], ham["beta"]) if ham["enabled"] else (None, None)
        grid[method_key(run.config)].append((*key, run.final["val_acc"]))
    chosen = {}
    lines = [
        "| method | no HAM val acc | best alpha | best beta | HAM val acc | grid (alpha, beta: val acc) |",
        "|---|---|---|---|---|---|",
    ]
    for method, cells in sorted(grid.items()):
        base = [acc for a, _, acc in cells if a is None]
        ham = sorted((c for c in cells if c[0] is not None), key=lambda c: -c[2])
        if not ham:
            continue
        a, b, acc = ham[0]
        chosen[method] = {
            "alpha": a,
            "beta": b,
            "val_acc": acc,
            "baseline_val_acc": base[0] if base else None,
        }
        searched = ", ".join(f"{ca:g}, {cb:g}: {cacc:.4f}" for ca, cb, cacc in sorted(ham))
        lines.append(
            f"| {method} | {base[0] if base else float('nan'):.4f} | {a:g} | {b:g} | {acc:.4f} | {searched} |"
        )
    (root / "selection.json").write_text(json.dumps(chosen, indent=2) + "\n")
    (root / "selection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return chosen


def _cell(config: dict) -> tuple:
    return (
        config["data"]["dataset"],
        config["model"]["name"],
        method_key(config),
        config["sparsity"]["target"] or 0.0,
    )


def table(root: Path, out: Path) -> Path:
    """Mean ± std test accuracy with and without HAM per cell; writes study.md and the flip figure."""
    acc: dict[tuple, dict[bool, list[float]]] = defaultdict(lambda: {False: [], True: []})
    for run in _finished(root):
        acc[_cell(run.config)][run.config["ham"]["enabled"]].append(100 * run.final["test_acc"])
    lines = [
        "| dataset | model | method | sparsity | without HAM | with HAM | HAM − base | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (data, model, method, target), by_ham in sorted(acc.items()):
        (m0, s0, n0), (m1, s1, n1) = mean_std(by_ham[False]), mean_std(by_ham[True])
        diff = f"{m1 - m0:+.2f}" if n0 and n1 else "–"
        lines.append(
            f"| {data} | {model} | {method} | {target:g} | {_pm(m0, s0, n0)} | {_pm(m1, s1, n1)} | "
            f"{diff} | {n0}/{n1} |"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _flips_figure(root, out / "flips_random_pai.png")
    return out / "study.md"


def _pm(mean: float, std: float, n: int) -> str:
    return "–" if not n else (f"{mean:.2f}" if n == 1 else f"{mean:.2f} ± {std:.2f}")


def _flips_figure(root: Path, path: Path) -> None:
    """Cumulative flips per 1,000 active weights of random PaI at 90%: mean and range over seeds."""
    curves: dict[bool, list[tuple[list[float], list[float]]]] = {False: [], True: []}
    for run in _finished(root):
        c = run.config
        if (method_key(c), c["sparsity"]["target"], c["model"]["name"], c["data"]["dataset"]) != (
            "static/random", 0.9, "lenet300", "fashion_mnist"
        ) or not run.flips:
            continue
        active = sum(layer["active"] for layer in run.flips[0]["layers"].values())
        total, xs, ys = 0, [], []
        for record in run.flips:
            total += sum(layer["unmasked"] + layer["masked"] for layer in record["layers"].values())
            xs.append(record["epoch"])
            ys.append(1000 * total / active)
        curves[c["ham"]["enabled"]].append((xs, ys))
    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    ax = fig.add_subplot()
    for ham, runs in curves.items():
        if not runs:
            continue
        n = min(len(ys) for _, ys in runs)
        xs = runs[0][0][:n]
        per_step = list(zip(*(ys[:n] for _, ys in runs)))
        mean = [sum(v) / len(v) for v in per_step]
        color = "tab:red" if ham else "tab:blue"
        label = f"{'with' if ham else 'without'} HAM (mean of {len(runs)} seeds)"
        ax.plot(xs, mean, color=color, label=label)
        ax.fill_between(xs, [min(v) for v in per_step], [max(v) for v in per_step], color=color, alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("cumulative sign flips per 1,000 active weights")
    ax.set_title("Random PaI (ERK) at 90%, LeNet-300-100, Fashion-MNIST", fontsize=10)
    ax.text(0.99, 0.02, "bands: min to max over seeds", transform=ax.transAxes, ha="right", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sparseham study", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sel = sub.add_parser("select", help="best HAM setting per method of a tuning sweep's runs, or (a "
                                        "tuning CSV) the equal-budget choice and the tuned sweep")
    sel.add_argument("root", type=Path,
                     help="a directory of runs, or a tuning cells CSV (docs/study/tune.csv)")
    sel.add_argument("--selection", type=Path, default=Path("docs/study/selection.md"))
    sel.add_argument("--sweep", type=Path, default=Path("configs/studies/study_tuned.yaml"))
    sel.add_argument("--data", nargs="+", default=["fashion_mnist", "mnist"])
    sel.add_argument("--models", nargs="+", default=["lenet300"])
    t = sub.add_parser("table", help="the results table of a directory of runs, or the paired HAM-vs-base "
                                     "table of a cells CSV")
    t.add_argument("root", type=Path, help="a directory of runs, or a cells CSV")
    t.add_argument("--out", type=Path, default=Path("docs"))
    t.add_argument("--readme", type=Path, help="a cells CSV: also paste the tables into this README, "
                                               "between its study-table markers")
    f = sub.add_parser("flips", help="cumulative sign flips of the RigL and random-PaI runs under a "
                                     "directory, as a small CSV to commit (the table draws flips.png)")
    f.add_argument("root", type=Path, help="a directory of runs (runs/studies/study)")
    f.add_argument("--out", type=Path, default=Path("docs/study/flips.csv"))
    r = sub.add_parser("rerun", help="re-run random cells of a study CSV with this code and compare "
                                     "their test accuracy (exit 1 on a difference)")
    r.add_argument("root", type=Path, help="the cells CSV (docs/study/cells.csv)")
    r.add_argument("sweep", help="the sweep file it belongs to (studies/study)")
    r.add_argument("--cells", type=int, default=3)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--model", help="only rows of this model (lenet300 reruns in seconds)")
    c = sub.add_parser("clamp", help="the HAM-robustness study's tables and heat maps from its cells CSV")
    c.add_argument("root", type=Path, help="the cells CSV (docs/study/ham_clamp/cells.csv)")
    c.add_argument("--out", type=Path, default=Path("docs/study/ham_clamp"))
    args = p.parse_args(argv)
    if args.cmd == "clamp":
        if not args.root.is_file():
            print(f"error: {args.root} is not a cells CSV", file=sys.stderr)
            return 2
        from sparseham.analysis.clamp_study import write

        print(f"wrote {write(args.root, args.out)}")
        return 0
    if args.cmd == "select" and args.root.is_file():
        from sparseham.analysis.budget import write

        write(args.root, args.selection, args.sweep, args.data, args.models)
        print(f"wrote {args.selection} and {args.sweep}")
        return 0
    if args.cmd == "table" and args.root.is_file():
        from sparseham.analysis.paired import write_table
        from sparseham.analysis.study_report import write

        results = write(args.root, args.out)
        print(f"wrote {write_table(args.root, args.out)} and {results}")
        if args.readme:
            from sparseham.analysis.study_report import paste

            paste(args.readme, results)
            print(f"updated {args.readme}")
        return 0
    if args.cmd == "rerun":
        from sparseham.analysis.reproduce import rerun

        where = (lambda row: row["model"] == args.model) if args.model else None
        results = rerun(args.root, args.sweep, args.cells, args.seed, where)
        for cell, stored, new in results:
            verdict = "(same)" if stored == new else "(DIFFERENT)"
            print(f"{cell}: stored {stored:.4f}, now {new:.4f} {verdict}")
        return 0 if all(stored == new for _, stored, new in results) else 1
    if args.cmd == "flips":
        from sparseham.analysis.study_report import extract_flips

        try:
            print(f"wrote {extract_flips(args.root, args.out)}")
        except FileNotFoundError as err:
            print(f"error: {err}; {args.out} left as it was", file=sys.stderr)
            return 2
        return 0
    if not args.root.is_dir():
        print(f"error: {args.root} is not a directory of runs", file=sys.stderr)
        return 2
    if args.cmd == "select":
        select(args.root)
    else:
        table(args.root, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
