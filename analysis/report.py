"""Sign-flip reports: ``sparseham report RUN [RUN ...] --out DIR [--top-k 8]``.

Writes ``DIR/report.html`` (self-contained: plots embedded as data URIs, inline CSS, no
scripts), ``DIR/report.md`` (the same tables, plots linked by relative path) and the plots as
PNG files in DIR. Several runs get a comparison table and overlaid curves; runs that differ
only by ``experiment.seed`` become one row with mean ± std. A run without ``final.json`` is
reported as far as its jsonl files go and marked "in progress".

Exit status: 0 on success, 2 when a path is not a run directory or has no sign-flip data
(or --top-k < 1), 1 on another I/O error; errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import base64
import html
import sys
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from sparseham.analysis.plots import compare_figure, run_figures
from sparseham.analysis.runs import (
    Run,
    flatten,
    flip_series,
    fmt_stat,
    group_by_seed,
    group_labels,
    load_run,
    summary,
)

__all__ = ["COLUMNS", "main", "write_report"]

# (header, summary key, decimals): one spec for every table, so all show the same digits.
COLUMNS = [
    ("test acc", "test_acc", 4), ("sparsity", "sparsity", 4), ("masked flips", "flips_masked", 0),
    ("unmasked flips", "flips_unmasked", 0), ("flips / 1,000 weights / epoch", "flip_rate", 2),
    ("ever flipped (fraction)", "ever_flipped_frac", 4), ("wall time (s)", "wall_time_s", 1),
]

METHOD_TEXT = (
    "Rates are sign flips per 1,000 weights per epoch. For each tracker interval, flips of "
    "masked weights are divided by the number of masked weights N−A, flips of unmasked weights "
    "by the number of unmasked weights A (as logged at the end of the interval), and all flips "
    "by the layer size N; each is divided by the interval's length in epochs (the epoch "
    "difference between consecutive records) and multiplied by 1,000. 'All layers' sums flips "
    "and weights over layers before dividing. Cumulative flips add up the interval counts. "
    "'Flipped at least once' and 'sign differs from the start' are fractions of N. The tables' "
    "flips / 1,000 weights / epoch is (masked + unmasked flips) × 1,000 / (N × epochs) over the "
    "whole run. Layer plots show the top-{k} layers by total flips plus the black 'all layers' "
    "aggregate; tables list every layer. Runs whose configs differ only in experiment.seed "
    "(ignoring experiment.name and out_dir) form one row: mean ± sample standard deviation "
    "(ddof=1) over n runs. Finished runs show final.json values; runs in progress show the "
    "last logged values."
)

_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1660px;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:.9em}"
    "th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}"
    "th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}"
    "img{max-width:100%;height:auto;display:block}figure{margin:1em 0}"
    "figcaption{font-size:.85em;color:#555}.note{background:#fff3cd;padding:.5em;"
    "border-left:4px solid #e0a800}"
)


def _labels(paths: Sequence[Path]) -> list[str]:
    """Directory names, lengthened with parents until unique."""
    resolved = [p.resolve() for p in paths]
    for depth in range(1, max(len(p.parts) for p in resolved) + 1):
        labels = ["/".join(p.parts[-depth:]) for p in resolved]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i + 1}:{p}" for i, p in enumerate(paths)]


def _status(runs: Sequence[Run]) -> str:
    busy = sum(r.in_progress for r in runs)
    if not busy:
        return "done"
    return "in progress" if busy == len(runs) else f"{busy} of {len(runs)} in progress"


def _stat_cells(runs: Sequence[Run]) -> list[str]:
    stats = [summary(r) for r in runs]
    return [fmt_stat([s.get(key) for s in stats], digits) for _, key, digits in COLUMNS]


def _comparison(runs: list[Run], labels: list[str]) -> tuple[list, list[int], list[str]]:
    """Blocks of the comparison section, each run's group index, and the group labels."""
    groups = group_by_seed([r.config for r in runs])
    single = labels[0] if len(runs) == 1 else "all seeds"
    names = group_labels([runs[g[0]].config for g in groups], single)
    head = ["group", "runs", "n", "status"] + [c[0] for c in COLUMNS]
    rows = [[f"#{i + 1} {name}", ", ".join(labels[j] for j in g), str(len(g)),
             _status([runs[j] for j in g])] + _stat_cells([runs[j] for j in g])
            for i, (name, g) in enumerate(zip(names, groups))]
    blocks = [("h2", "Comparison", "comparison-section"), ("table", "comparison", head, rows)]
    if any(len(g) > 1 for g in groups):
        per_run = [[labels[j], f"#{i + 1}", _status([runs[j]])] + _stat_cells([runs[j]])
                   for i, g in enumerate(groups) for j in g]
        blocks += [("p", "Rows with n > 1 show mean ± std over seeds; the runs one by one:"),
                   ("table", "per-run", ["run", "group", "status"] + [c[0] for c in COLUMNS],
                    per_run)]
    index = {j: i for i, g in enumerate(groups) for j in g}
    return blocks, [index[j] for j in range(len(runs))], names


def _run_table(run: Run) -> list[list[str]]:
    stats, flat = summary(run), flatten(run.config)
    ham = stats.get("ham") or {k: flat.get(f"ham.{k}") for k in ("enabled", "alpha", "beta")}
    rows = [
        ("status", "in progress" if run.in_progress else "done"), ("path", str(run.path)),
        ("method", stats.get("method", flat.get("sparsity.method"))),
        ("target sparsity", stats.get("target", flat.get("sparsity.target"))),
        ("HAM", f"enabled={ham.get('enabled')}, α={ham.get('alpha')}, β={ham.get('beta')}, "
                f"clamp={ham.get('clamp', flat.get('ham.clamp'))}"),
        *_ham_rows(run, ham),
        ("dataset / model", f"{flat.get('data.dataset')} / {flat.get('model.name')}"),
        ("lr / seed", f"{flat.get('optim.lr')} / {flat.get('experiment.seed')}"),
        ("steps / epochs", f"{stats.get('steps')} / {stats.get('epochs')}"),
        ("test loss", fmt_stat([stats.get("test_loss")], 4)),
        ("val acc", fmt_stat([stats.get("val_acc")], 4)),
        ("sign differs from start (fraction)", fmt_stat([stats.get("differs_from_init_frac")], 4)),
    ]
    rows += [(head, fmt_stat([stats.get(key)], d)) for head, key, d in COLUMNS]
    return [[name, str(value)] for name, value in rows]


def _ham_rows(run: Run, ham: dict) -> list[tuple[str, str]]:
    """HAM's trust-region diagnostics (final.json, or the train records so far) and warnings."""
    records = [r["ham"] for r in run.events("train") if isinstance(r.get("ham"), dict)]
    fraction, capped = ham.get("clamped_fraction"), ham.get("capped")
    if fraction is None and records:
        taken = [r["clamped_fraction"] for r in records if r.get("clamped_fraction") is not None]
        fraction = sum(taken) / len(taken) if taken else None
        capped = sum(r.get("capped", 0) for r in records)
    rows = []
    if fraction is not None:
        rows.append(("HAM exponent at the clamp (fraction of entries)", fmt_stat([fraction], 4)))
        rows.append(("HAM norm cap rescaled a tensor (times)", str(capped)))
    rows += [("warning", str(w.get("message"))) for w in run.events("warning")]
    return rows


def _layer_table(run: Run) -> list[list[str]]:
    """One row per tracked layer; final.json's values where the run has finished."""
    fs, final = flip_series(run.flips), (run.final or {}).get("layers") or {}
    epochs = summary(run).get("epochs") or 0.0
    rows = []
    for j, name in enumerate(fs.layers):
        numel = fs.numel[-1, j]
        info = {"shape": None, "sparsity": 1 - fs.active[-1, j] / numel if numel else None,
                "flips_masked": int(fs.masked[:, j].sum()),
                "flips_unmasked": int(fs.unmasked[:, j].sum()), **final.get(name, {})}
        flips = info["flips_masked"] + info["flips_unmasked"]
        rate = flips * 1000.0 / (numel * epochs) if numel and epochs else None
        shape = "×".join(map(str, info["shape"])) if info["shape"] else "—"
        rows.append([name, shape, str(int(numel)), fmt_stat([info["sparsity"]], 4),
                     str(info["flips_masked"]), str(info["flips_unmasked"]), fmt_stat([rate], 2),
                     fmt_stat([fs.ever[-1, j] / numel if numel else None], 4)])
    return rows


_LAYER_HEAD = ["layer", "shape", "numel", "sparsity", "masked flips", "unmasked flips",
               "flips / 1,000 weights / epoch", "ever flipped (fraction)"]
_CAPTIONS = {
    "flip_rate": "Sign-flip rate per tracker interval: masked, unmasked and all weights.",
    "cumulative": "Cumulative sign flips: counts over all layers, and per 1,000 weights by layer.",
    "fractions": "Fraction of weights that flipped at least once / whose sign differs from the "
                 "start.",
    "histogram": "How many times each weight flipped (last tracker record; last bin saturates).",
    "masks": "Per-layer sparsity and mask churn (as a fraction of the layer) at each mask change.",
    "curves": "Training and evaluation loss and accuracy.",
}


def _figure_block(fig: Figure, out: Path, stem: str, caption: str) -> tuple:
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=100)
    return ("img", path.name, caption, path.read_bytes())


def _run_blocks(i: int, run: Run, label: str, out: Path, top_k: int) -> list[tuple]:
    stem = f"run{i + 1}"
    title = f"Run {i + 1}: {label}" + (" (in progress)" if run.in_progress else "")
    blocks: list[tuple] = [("h2", title, stem)]
    if run.in_progress:
        last = run.flips[-1]
        blocks.append(("note", f"In progress: {run.path}/final.json is missing; shown up to "
                               f"step {last.get('step')} (epoch {last.get('epoch')})."))
    blocks += [("note", f"Note: {note}.") for note in run.notes]
    blocks.append(("table", f"{stem}-summary", ["quantity", "value"], _run_table(run)))
    figures = run_figures(run, label, top_k)
    blocks += [_figure_block(fig, out, f"{stem}_{name}", _CAPTIONS[name])
               for name, fig in figures.items()]
    if "masks" not in figures:
        blocks.append(("p", "No mask events were logged: the masks never changed."))
    return blocks + [("h3", "Layers", f"{stem}-layers-section"),
                     ("table", f"{stem}-layers", _LAYER_HEAD, _layer_table(run))]


def _html_block(kind: str, *args) -> str:
    esc = html.escape
    match kind:
        case "h1" | "h2" | "h3":
            return f'<{kind} id="{esc(args[1])}">{esc(args[0])}</{kind}>'
        case "p":
            return f"<p>{esc(args[0])}</p>"
        case "note":
            return f'<p class="note">{esc(args[0])}</p>'
        case "table":
            ident, head, rows = args
            ths = "".join(f"<th>{esc(h)}</th>" for h in head)
            trs = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                          for row in rows)
            return (f'<table id="{esc(ident)}"><thead><tr>{ths}</tr></thead>'
                    f"<tbody>{trs}</tbody></table>")
        case _:
            name, caption, data = args
            uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
            return (f'<figure><img src="{uri}" alt="{esc(caption)}"><figcaption>{esc(caption)} '
                    f"({esc(name)})</figcaption></figure>")


def _md_block(kind: str, *args) -> str:
    line = lambda cells: "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    match kind:
        case "h1" | "h2" | "h3":
            return "#" * int(kind[1]) + " " + args[0]
        case "p":
            return args[0]
        case "note":
            return f"> **{args[0]}**"
        case "table":
            _, head, rows = args
            return "\n".join([line(head), "|" + "---|" * len(head), *map(line, rows)])
        case _:
            return f"![{args[1]}]({args[0]})\n\n*{args[1]}*"


def _render_html(blocks: list[tuple]) -> str:
    head = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            '<title>Sign-flip report</title><link rel="icon" href="data:,">'
            f"<style>{_CSS}</style></head><body>")
    return head + "\n".join(_html_block(*b) for b in blocks) + "\n</body></html>\n"


def write_report(runs: list[Path], out: Path, top_k: int = 8) -> Path:
    """Writes report.html, report.md and the plots (PNG) for ``runs`` into ``out``.

    Args:
        runs: run directories (at least one).
        out: output directory, created if missing.
        top_k: layers drawn per per-layer plot, besides the "all layers" aggregate.

    Returns:
        The path of report.html.

    Raises:
        RunError: a path is not a run directory or has no sign-flip data.
        ValueError: no runs, or ``top_k`` < 1.
    """
    if top_k < 1 or not runs:
        raise ValueError(f"--top-k must be >= 1 and runs given, got top_k={top_k}, {len(runs)} runs")
    unique = list({Path(p).resolve(): Path(p) for p in reversed(runs)}.values())[::-1]  # a run given twice
    loaded = [load_run(p) for p in unique]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = _labels([r.path for r in loaded])
    blocks = [("h1", "Sign-flip report", "top"),
              ("p", f"{len(loaded)} run(s): " + ", ".join(str(r.path) for r in loaded)),
              ("h2", "How the numbers are computed", "method"),
              ("p", METHOD_TEXT.format(k=top_k))]
    comparison, groups, names = _comparison(loaded, labels)
    blocks += comparison
    if len(loaded) > 1:
        caption = "Runs overlaid (one colour per group of seeds)."
        blocks.append(_figure_block(compare_figure(loaded, groups, names), out, "compare", caption))
    for i, (run, label) in enumerate(zip(loaded, labels)):
        blocks += _run_blocks(i, run, label, out, top_k)
    (out / "report.md").write_text("\n\n".join(_md_block(*b) for b in blocks) + "\n")
    (out / "report.html").write_text(_render_html(blocks))
    return out / "report.html"


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="sparseham report",
                                     description="Sign-flip report (HTML + Markdown) for runs.")
    parser.add_argument("runs", nargs="+", type=Path, help="run directories written by sparseham train")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--top-k", type=int, default=8,
                        help="layers per per-layer plot, besides the aggregate (default 8)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.runs, args.out, args.top_k)
    except ValueError as err:  # RunError included
        print(f"sparseham report: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"sparseham report: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
