"""The HAM-robustness study's tables and heat maps: ``sparseham study clamp CELLS.csv --out DIR``.

Reads the cells CSV of ``configs/studies/ham_clamp.yaml`` and writes ``DIR/results.md`` and one
heat map per model, ``DIR/heatmap_<model>.png``, of validation accuracy over (alpha, clamp) per
method and sparsity. Everything uses ``val_acc`` (10% of the training set held out); the test set
plays no part in the choice. A run *collapses* when its validation accuracy is more than 5 points
below the no-HAM run of its cell (same model, method, sparsity and seed). The selection rule,
robustness first: the default clamp must not collapse any cell at *any* alpha of the grid (a user
may set alpha anywhere from 20 to 1000); among such clamps, the highest mean gain at the paper's
alpha = 200 (:func:`choose_clamp`).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from sparseham.analysis.cells import read_rows  # noqa: E402

__all__ = ["COLLAPSE", "DEFAULTS", "FIRST_VERSION", "PAPER_ALPHA", "against", "choose_clamp", "load",
           "select", "write"]

COLLAPSE = 0.05
PAPER_ALPHA = 200.0
DEFAULTS = (200.0, 0.02)  # HAM's defaults: alpha, clamp
FIRST_VERSION = (50.0, 5.0)  # the first version's tuned alpha with the authors' clamp


def _cell(row: dict) -> tuple[str, str, str]:
    return row["model"], row["method"], row["target"] or "0"


def load(path: Path):
    """``(base, grid)``: per cell and seed the no-HAM val_acc; per cell, (alpha, clamp) and seed
    the HAM val_acc."""
    base: dict = defaultdict(dict)
    grid: dict = defaultdict(lambda: defaultdict(dict))
    for row in read_rows(path):
        if not row["val_acc"]:
            continue
        if row["ham"] == "True":
            grid[_cell(row)][(float(row["alpha"]), float(row["clamp"]))][row["seed"]] = float(row["val_acc"])
        else:
            base[_cell(row)][row["seed"]] = float(row["val_acc"])
    return base, grid


def _gains(base, grid, pair) -> list[tuple[tuple, str, float]]:
    return [(cell, seed, acc - base[cell][seed]) for cell, runs in grid.items()
            for seed, acc in runs.get(pair, {}).items() if seed in base[cell]]


def select(base, grid) -> list[dict]:
    """Per (alpha, clamp): runs, collapses, min and mean gain (points), best first by the rule."""
    pairs = sorted({pair for runs in grid.values() for pair in runs})
    out = []
    for alpha, clamp in pairs:
        gains = [g for _, _, g in _gains(base, grid, (alpha, clamp))]
        if gains:
            out.append({"alpha": alpha, "clamp": clamp, "runs": len(gains),
                        "collapses": sum(g < -COLLAPSE for g in gains),
                        "min_gain": 100 * min(gains), "mean_gain": 100 * statistics.mean(gains)})
    return sorted(out, key=lambda r: (r["collapses"] > 0, -r["mean_gain"]))


def choose_clamp(ranking: list[dict], base=None, grid=None) -> dict | None:
    """The rule of the module docstring over :func:`select`'s rows; ``None`` when no clamp is safe.

    Given ``base`` and ``grid``, the safe clamps' mean gains at the paper's alpha are compared on
    the runs (cell, seed) they all have, so a clamp run on fewer, easier cells does not win by that.
    """
    safe = {c for c in {r["clamp"] for r in ranking}
            if not any(r["collapses"] for r in ranking if r["clamp"] == c)}
    at_paper = [r for r in ranking if r["clamp"] in safe and r["alpha"] == PAPER_ALPHA]
    if base is not None and at_paper:
        runs = [{(cell, seed): g for cell, seed, g in _gains(base, grid, (PAPER_ALPHA, r["clamp"]))}
                for r in at_paper]
        common = set.intersection(*(set(r) for r in runs))
        at_paper = [{**r, "runs": len(common), "mean_gain": 100 * statistics.mean(g[k] for k in common),
                     "min_gain": 100 * min(g[k] for k in common)} for r, g in zip(at_paper, runs) if common]
    return max(at_paper, key=lambda r: r["mean_gain"], default=None)


def against(base, grid, new=DEFAULTS, old=FIRST_VERSION) -> list[dict]:
    """Per method, over the (cell, seed) runs that have both settings: runs, collapses of each and
    the mean gain (points) of each; the issue's acceptance compares the two on the same runs."""
    both = defaultdict(list)
    for cell, runs in grid.items():
        for seed in set(runs.get(new, {})) & set(runs.get(old, {})) & set(base[cell]):
            both[cell[1]].append((runs[new][seed] - base[cell][seed], runs[old][seed] - base[cell][seed]))
    return [{"method": m, "runs": len(g), "new_collapses": sum(a < -COLLAPSE for a, _ in g),
             "old_collapses": sum(b < -COLLAPSE for _, b in g),
             "new_gain": 100 * statistics.mean(a for a, _ in g),
             "old_gain": 100 * statistics.mean(b for _, b in g)}
            for m, g in sorted(both.items())]


def _mean(values) -> float:
    return statistics.mean(values) if values else float("nan")


def _heatmap(model: str, base, grid, alphas, clamps, path: Path) -> None:
    cells = sorted(c for c in grid if c[0] == model)
    fig = Figure(figsize=(3.2 * len(cells), 3.0), layout="constrained")
    axes = fig.subplots(1, len(cells), squeeze=False)[0]
    for ax, cell in zip(axes, cells):
        values = [[_mean(list(grid[cell].get((a, c), {}).values())) for c in clamps] for a in alphas]
        image = ax.imshow(values, vmin=0.1, vmax=max(max(v for row in values for v in row if v == v), 0.11),
                          cmap="viridis", aspect="auto")
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{100 * v:.1f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 0.5 else "black")
        ax.set_xticks(range(len(clamps)), [f"{c:g}" for c in clamps], fontsize=7)
        ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas], fontsize=7)
        ax.set_xlabel("clamp c", fontsize=8)
        ax.set_ylabel("alpha", fontsize=8)
        no_ham = _mean(list(base[cell].values()))
        ax.set_title(f"{cell[1]} {cell[2]}: no HAM {100 * no_ham:.1f}", fontsize=8)
    fig.colorbar(image, ax=axes.tolist(), shrink=0.8, label="val acc")
    fig.suptitle(f"{model}: validation accuracy (%) over (alpha, clamp)", fontsize=9)
    fig.savefig(path, dpi=110)


def write(csv_path: Path, out: Path) -> Path:
    """Write ``results.md`` and the heat maps; returns the Markdown file."""
    base, grid = load(csv_path)
    alphas = sorted({a for runs in grid.values() for a, _ in runs})
    clamps = sorted({c for runs in grid.values() for _, c in runs}, reverse=True)
    out.mkdir(parents=True, exist_ok=True)
    ranking = select(base, grid)
    lines = ["# HAM's trust region: clamp against alpha (validation accuracy)", "",
             f"From `{csv_path}`; generated by `sparseham study clamp`. A run collapses when it is more "
             f"than {100 * COLLAPSE:g} points below the no-HAM run of its cell and seed. Gains are HAM "
             "minus no HAM, in points, over every (cell, seed) run so far.", "",
             "| alpha | clamp | runs | collapses | min gain | mean gain |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['alpha']:g} | {r['clamp']:g} | {r['runs']} | {r['collapses']} | {r['min_gain']:+.2f} | "
              f"{r['mean_gain']:+.2f} |" for r in ranking]
    chosen = choose_clamp(ranking, base, grid)
    if chosen is not None:
        lines += ["", f"By the rule (no collapse at any alpha, then the highest mean gain at alpha "
                  f"{PAPER_ALPHA:g}, on the runs all safe clamps have): clamp {chosen['clamp']:g} "
                  f"({chosen['mean_gain']:+.2f} points on average, {chosen['min_gain']:+.2f} at least, "
                  f"over those {chosen['runs']} runs)."]
    rows = against(base, grid)
    if rows:
        (a, c), (a0, c0) = DEFAULTS, FIRST_VERSION
        lines += ["", f"## The defaults (alpha {a:g}, clamp {c:g}) against alpha {a0:g} with clamp {c0:g}",
                  "", "Over the runs (cell, seed) that have both, per method: collapses and mean gain over "
                  "no HAM.", "", "| method | runs | collapses, defaults | collapses, first version | "
                  "mean gain, defaults | mean gain, first version |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['runs']} | {r['new_collapses']} | {r['old_collapses']} | "
                  f"{r['new_gain']:+.2f} | {r['old_gain']:+.2f} |" for r in rows]
    for model in sorted({c[0] for c in grid}):
        path = out / f"heatmap_{model}.png"
        _heatmap(model, base, grid, alphas, clamps, path)
        lines += ["", f"## {model}", "", f"![{model}]({path.name})", "",
                  "| method | sparsity | seeds | no HAM | " + " | ".join(f"a={a:g}, c={c:g}" for a in alphas
                                                                     for c in clamps) + " |",
                  "|---|---|---|---|" + "---|" * (len(alphas) * len(clamps))]
        for cell in sorted(c for c in grid if c[0] == model):
            accs = [_mean(list(grid[cell].get((a, c), {}).values())) for a in alphas for c in clamps]
            no_ham = 100 * _mean(list(base[cell].values()))
            lines.append(f"| {cell[1]} | {cell[2]} | {len(base[cell])} | {no_ham:.2f} | "
                         + " | ".join("–" if v != v else f"{100 * v:.2f}" for v in accs) + " |")
    md = out / "results.md"
    md.write_text("\n".join(lines) + "\n")
    return md
