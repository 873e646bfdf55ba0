"""The study's tables and figures from its committed CSVs (issue 17).

``sparseham study table docs/study/cells.csv`` writes, next to the paired per-cell table
(:mod:`sparseham.analysis.paired`), ``results.md``:

- per data set and model, HAM − base in test-accuracy points for every method and sparsity: the
  mean paired difference over seeds with its 95% t-interval half-width, at the defaults and, where
  ``tune.csv`` and ``tuned.csv`` sit beside the CSV, with equal tuning budgets (an arm whose
  choice was the defaults keeps its at-defaults runs, see :mod:`sparseham.analysis.budget`);
- wins, ties and losses per method (the interval above, around or below 0);
- HAM's gains beside the paper's ImageNet ResNet-50 gains at 90% and 95%;

and ``gain_vs_sparsity.png`` (gain against sparsity per method, one panel per data set and model)
and, from ``flips.csv`` (``sparseham study flips``), ``flips.png``: cumulative sign flips per
1,000 active weights of RigL and random PaI with and without HAM (the paper's Fig. 2a).
The README's study tables are copied from ``results.md``, and a test checks that they match.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from sparseham.analysis.budget import arm, select  # noqa: E402
from sparseham.analysis.cells import read_rows  # noqa: E402
from sparseham.analysis.paired import compare, tally  # noqa: E402

__all__ = ["METHODS", "PAPER", "gains", "tuned_rows", "write", "extract_flips"]

# Display order and names: (method, init) -> label.
METHODS = {("dense", ""): "dense", ("static", "random"): "random PaI", ("static", "snip"): "SNIP",
           ("static", "synflow"): "SynFlow", ("gmp", ""): "GMP", ("rigl", ""): "RigL",
           ("acdc", ""): "AC/DC", ("str", ""): "STR"}
TARGETS = ("0", "0.9", "0.95", "0.98")
# HAM − base on ImageNet / ResNet-50 (the paper's tables, PAPER-NOTES.md §3): dense at 100 epochs.
PAPER = {"dense": {"0": 0.79}, "random PaI": {"0.9": 1.16, "0.95": 1.33}, "RigL": {"0.9": 1.13, "0.95": 1.04},
         "AC/DC": {"0.9": 1.91, "0.95": 2.86}, "STR": {"0.9": 2.61, "0.95": 6.47}}
DATA = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST"}
MODELS = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5", "resnet20": "ResNet-20"}


def _label(entry: dict) -> str:
    key = (entry["method"], entry["init"] if entry["method"] == "static" else "")
    return METHODS.get(key, "/".join(k for k in key if k))


def _target(entry: dict) -> str:
    return f"{float(entry['target'] or 0):g}"


def gains(rows: list[dict]) -> dict[tuple[str, str], dict[str, dict[str, dict]]]:
    """(dataset, model) -> method label -> target -> the paired entry of :func:`compare`."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for e in compare(rows):
        out[(e["dataset"], e["model"])][_label(e)][_target(e)] = e
    return out


def tuned_rows(cells: list[dict], tune: list[dict], tuned: list[dict]) -> list[dict]:
    """The tuned grid: each arm tuned away from the defaults from ``tuned``, the others from
    ``cells``, for the data sets and models that ``tuned`` covers."""
    moved = {key for key, c in select(tune).items() if (c["lr"], c["weight_decay"]) != ("0.05", "0.0005")}
    covered = {(r["dataset"], r["model"]) for r in tuned}
    kept = [r for r in cells if (r["dataset"], r["model"]) in covered and arm(r) not in moved]
    return kept + [r for r in tuned if arm(r) in moved]


def _gain_text(e: dict | None) -> str:
    if e is None:
        return "–"
    if e["ci"] is None:
        return f"{e['diff']:+.2f} (1 seed)"
    return f"{e['diff']:+.2f} ± {(e['ci'][1] - e['ci'][0]) / 2:.2f}"


def _gain_tables(title: str, by_pair: dict) -> list[str]:
    lines = []
    for (data, model), methods in sorted(by_pair.items()):
        seeds = sorted({e["seeds"] for per in methods.values() for e in per.values()})
        lines += ["", f"**{title}: {DATA.get(data, data)}, {MODELS.get(model, model)}** "
                  f"(HAM − base, test accuracy points, mean ± 95% CI half-width over "
                  f"{'/'.join(map(str, seeds))} seeds)", "",
                  "| method | dense | 90% | 95% | 98% |", "|---|---|---|---|---|"]
        for label in [m for m in METHODS.values() if m in methods]:
            per = methods[label]
            lines.append(f"| {label} | " + " | ".join(_gain_text(per.get(t)) for t in TARGETS) + " |")
    return lines


def _tally_lines(title: str, rows: list[dict]) -> list[str]:
    counts: dict = defaultdict(lambda: {"wins": 0, "ties": 0, "losses": 0, "unresolved": 0})
    entries = compare(rows)
    for e in entries:  # one setting per method here: fold the (alpha, beta, clamp) keys
        for k, v in tally([e]).popitem()[1].items():
            counts[_label(e)][k] += v
    lines = ["", f"**{title}: cells where HAM wins, ties or loses** (95% interval of the paired "
             "difference above, around or below 0)", "", "| method | wins | ties | losses | 1 seed only |",
             "|---|---|---|---|---|"]
    for label in [m for m in METHODS.values() if m in counts]:
        c = counts[label]
        lines.append(f"| {label} | {c['wins']} | {c['ties']} | {c['losses']} | {c['unresolved']} |")
    return lines


def _paper_lines(by_pair: dict) -> list[str]:
    pairs = sorted(by_pair)
    head = " | ".join(f"{DATA.get(d, d)} {MODELS.get(m, m)} {t}" for d, m in pairs for t in ("90%", "95%"))
    lines = ["", "**HAM's gain here (at the defaults) beside the paper's** (ImageNet, ResNet-50; dense: "
             "100 epochs, shown under 90%)", "",
             f"| method | paper 90% | paper 95% | {head} |", "|---|---|---|" + "---|" * (2 * len(pairs))]
    for label in METHODS.values():
        paper = PAPER.get(label, {})
        p90 = paper.get("0.9", paper.get("0"))
        cells = []
        for pair in pairs:
            per = by_pair[pair].get(label, {})
            for t in ("0.9", "0.95"):
                e = per.get("0" if label == "dense" and t == "0.9" else t)
                cells.append("–" if e is None else f"{e['diff']:+.2f}")
        text = [f"{v:+.2f}" if v is not None else "–" for v in (p90, paper.get("0.95"))]
        lines.append(f"| {label} | {text[0]} | {text[1]} | " + " | ".join(cells) + " |")
    return lines


def _gain_figure(by_pair: dict, path: Path) -> None:
    pairs = sorted(by_pair)
    fig = Figure(figsize=(4.2 * max(len(pairs), 1), 3.6), dpi=110)
    for i, pair in enumerate(pairs, 1):
        ax = fig.add_subplot(1, len(pairs), i)
        for label in METHODS.values():
            per = by_pair[pair].get(label, {})
            points = [(float(t), per[t]) for t in TARGETS[1:] if t in per]
            if not points:
                continue
            xs = [100 * x for x, _ in points]
            ys = [e["diff"] for _, e in points]
            err = [0 if e["ci"] is None else (e["ci"][1] - e["ci"][0]) / 2 for _, e in points]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"{DATA.get(pair[0], pair[0])}, {MODELS.get(pair[1], pair[1])}", fontsize=9)
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("HAM − base (test acc. points)")
        ax.grid(alpha=0.3)
    if pairs:
        fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def extract_flips(root: Path, out: Path) -> Path:
    """Cumulative flips per 1,000 active weights of each RigL and random-PaI run under ``root``
    (their ``signflips.jsonl``), one row per log record: a small committed stand-in for runs/."""
    from sparseham.analysis.runs import RunError, load_run

    rows = []
    for d in sorted(f.parent for f in root.rglob("final.json")):
        try:
            run = load_run(d, require_flips=False)
        except RunError:
            continue
        c = run.config
        method = c["sparsity"]["method"]
        wanted = method == "rigl" or (method == "static" and c["sparsity"]["init"] == "random")
        if not run.flips or not wanted:
            continue
        active = sum(layer["active"] for layer in run.flips[0]["layers"].values())
        total = 0
        for record in run.flips:
            total += sum(layer["unmasked"] + layer["masked"] for layer in record["layers"].values())
            rows.append({"dataset": c["data"]["dataset"], "model": c["model"]["name"], "method": method,
                         "target": c["sparsity"]["target"], "ham": c["ham"]["enabled"],
                         "seed": c["experiment"]["seed"], "epoch": round(record["epoch"], 4),
                         "flips_per_1000": round(1000 * total / active, 3)})
    if not rows:  # never replace a committed file with nothing (a new machine has no runs/)
        raise FileNotFoundError(f"no RigL or random-PaI runs with sign flips under {root}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def _flips_figure(flips_csv: Path, path: Path) -> None:
    curves: dict = defaultdict(list)
    for r in read_rows(flips_csv):
        if (r["dataset"], r["model"], r["target"]) != ("fashion_mnist", "lenet300", "0.9"):
            continue
        point = (float(r["epoch"]), float(r["flips_per_1000"]))
        curves[(r["method"], r["ham"] == "True", r["seed"])].append(point)
    fig = Figure(figsize=(8.4, 3.6), dpi=110)
    for i, method in enumerate(("static", "rigl"), 1):
        ax = fig.add_subplot(1, 2, i)
        for ham, color in ((False, "tab:blue"), (True, "tab:red")):
            runs = [v for (m, h, _), v in sorted(curves.items()) if m == method and h == ham]
            if not runs:
                continue
            n = min(len(v) for v in runs)
            xs = [x for x, _ in runs[0][:n]]
            per = list(zip(*([y for _, y in v[:n]] for v in runs)))
            ax.plot(xs, [sum(p) / len(p) for p in per], color=color,
                    label=f"{'with' if ham else 'without'} HAM ({len(runs)} seeds)")
            ax.fill_between(xs, [min(p) for p in per], [max(p) for p in per], color=color, alpha=0.2)
        ax.set_title(f"{'random PaI' if method == 'static' else 'RigL'} at 90%, LeNet-300-100, Fashion-MNIST",
                     fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("cumulative flips per 1,000 active weights")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def write(cells_csv: Path, out: Path) -> Path:
    """``out/results.md`` and the figures (see the module docstring); returns results.md."""
    cells = read_rows(cells_csv)
    here = cells_csv.parent
    by_pair = gains(cells)
    lines = ["# The study: HAM against its baseline", "",
             f"Generated by `sparseham study table {cells_csv}` from the committed rows "
             f"({len(cells)} runs at the defaults).",
             *_gain_tables("At the defaults", by_pair), *_tally_lines("At the defaults", cells),
             *_paper_lines(by_pair)]
    tune, tuned = here / "tune.csv", here / "tuned.csv"
    if tune.is_file() and tuned.is_file():
        rows = tuned_rows(cells, read_rows(tune), read_rows(tuned))
        lines += ["", f"Tuned: {len(read_rows(tuned))} runs in `{tuned}`, the rest reused from the defaults.",
                  *_gain_tables("Equal tuning budgets", gains(rows)),
                  *_tally_lines("Equal tuning budgets", rows)]
    out.mkdir(parents=True, exist_ok=True)
    _gain_figure(by_pair, out / "gain_vs_sparsity.png")
    if (here / "flips.csv").is_file():
        _flips_figure(here / "flips.csv", out / "flips.png")
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path
