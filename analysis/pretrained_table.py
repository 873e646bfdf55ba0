"""The tables of the pretrained-subject study (:mod:`.pretrained_study`) from its cells CSV.

Per subject and metric, one line per (method, sparsity): the one-shot value, each recovery arm's
mean ± std (ddof 1) over seeds, and the HAM − no-HAM differences (``ham − plain``,
``distill_ham − distill``), paired by seed, with the 95% Student-t interval computed by
:func:`sparseham.analysis.paired.compare`, the code of ``sparseham study table``. (``compare``
reports accuracies in points, ×100; the entries are scaled back, which is exact for a mean, a
standard deviation and an interval.) Then two generated verdicts:

- **Ordering**: whether the literature's one-shot ordering holds at each sparsity: SparseGPT ≤ Wanda <
  magnitude in perplexity, SparseGPT ≥ Wanda > magnitude in cosine.
- **HAM**: per comparison, *helps* (the interval lies on the better side of 0: higher cosine, lower
  perplexity), *hurts* (on the worse side), *no difference* (it contains 0) or *one seed*.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from sparseham.analysis.cells import read_rows
from sparseham.analysis.paired import compare

# The grid's axes (the study runs them; defined here so that the table needs nothing of the runner).
METHODS = ("magnitude", "wanda", "sparsegpt")
SPARSITIES = ("0.5", "0.7", "2:4")
ARMS = {"minilm": ("distill", "distill_ham"), "llama": ("plain", "ham", "distill", "distill_ham")}

__all__ = ["ARMS", "METHODS", "METRICS", "PAIRS", "SPARSITIES", "ham_entries", "ordering", "write_table"]

#: subject -> (metric, higher is better, digits)
METRICS = {"minilm": (("cos_mean", True, 4), ("cos_worst", True, 4)), "llama": (("perplexity", False, 3),)}
#: (no-HAM arm, HAM arm, family)
PAIRS = (("plain", "ham", "plain"), ("distill", "distill_ham", "distill"))
_ORDER = ("sparsegpt", "wanda", "magnitude")


def ham_entries(rows: list[dict], metric: str) -> list[dict]:
    """:func:`~sparseham.analysis.paired.compare` over the recovery rows, in the metric's units, keyed
    by dataset = subject, method, target = sparsity, distribution = family (plain or distill)."""
    mapped = []
    for r in rows:
        if r["stage"] != "recovery" or not r.get(metric):
            continue
        family = "distill" if r["distill"] == "True" else "plain"
        mapped.append({"dataset": r["subject"], "model": "", "method": r["method"], "init": "",
                       "distribution": family, "target": r["sparsity"], "ham": r["ham"], "alpha": "",
                       "beta": "", "clamp": "", "seed": r["seed"], metric: r[metric]})
    out = []
    for e in compare(mapped, metric):
        for k in ("base_mean", "base_std", "ham_mean", "ham_std", "diff"):
            e[k] = None if e[k] is None else e[k] / 100
        e["ci"] = None if e["ci"] is None else (e["ci"][0] / 100, e["ci"][1] / 100)
        out.append(e)
    return out


def _verdict(e: dict, higher: bool) -> str:
    if e["ci"] is None:
        return "one seed"
    lo, hi = e["ci"] if higher else (-e["ci"][1], -e["ci"][0])
    return "helps" if lo > 0 else "hurts" if hi < 0 else "no difference"


def ordering(oneshot: dict[str, float], higher: bool) -> str:
    """The verdict on SparseGPT, Wanda, magnitude at one sparsity (``oneshot``: method -> value)."""
    if not all(m in oneshot for m in _ORDER):
        return "incomplete"
    s, w, m = (oneshot[k] if higher else -oneshot[k] for k in _ORDER)
    if s >= w > m:
        return "holds"
    broken = [t for t, ok in (("SparseGPT vs Wanda", s >= w), ("Wanda vs magnitude", w > m)) if not ok]
    return "does not hold (" + ", ".join(broken) + ")"


def _fmt(mean: float | None, std: float | None, digits: int) -> str:
    if mean is None:
        return ""
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _arm_stats(rows: list[dict], metric: str) -> dict[tuple, list[float]]:
    values: dict = defaultdict(list)
    for r in rows:
        if r["stage"] == "recovery" and r.get(metric):
            values[(r["subject"], r["method"], r["sparsity"], r["arm"])].append(float(r[metric]))
    return values


def _section(rows: list[dict], subject: str, metric: str, higher: bool, digits: int) -> list[str]:
    import statistics

    mine = [r for r in rows if r["subject"] == subject]
    oneshot = {(r["method"], r["sparsity"]): float(r[metric]) for r in mine if r["stage"] == "oneshot"}
    dense = [float(r[metric]) for r in mine if r["stage"] == "dense"]
    arms, pairs = ARMS[subject], [p for p in PAIRS if p[1] in ARMS[subject]]
    stats = _arm_stats(mine, metric)
    diffs = {(e["method"], e["target"], e["distribution"]): e for e in ham_entries(mine, metric)}
    lines = [f"## {subject}: {metric} ({'higher' if higher else 'lower'} is better)", ""]
    if dense:
        lines += [f"Dense: {dense[0]:.{digits}f}", ""]
    lines += ["| method | sparsity | one-shot | " + " | ".join(arms) + " | "
              + " | ".join(f"{h} − {b} [95% CI]" for b, h, _ in pairs) + " |",
              "|---|---|---|" + "---|" * (len(arms) + len(pairs))]
    verdicts = []
    for method in METHODS:
        for sparsity in SPARSITIES:
            cells = []
            for arm in arms:
                v = stats.get((subject, method, sparsity, arm), [])
                cells.append(_fmt(statistics.mean(v), statistics.stdev(v) if len(v) > 1 else None, digits)
                             + f" (n={len(v)})" if v else "")
            for _, ham, family in pairs:
                e = diffs.get((method, sparsity, family))
                ci = ("" if e is None or e["ci"] is None
                      else f" [{e['ci'][0]:+.{digits}f}, {e['ci'][1]:+.{digits}f}]")
                cells.append("" if e is None else f"{e['diff']:+.{digits}f}{ci}")
                if e is not None:
                    verdicts.append(f"{method} {sparsity} {ham}: {_verdict(e, higher)} (n={e['seeds']})")
            shot = oneshot.get((method, sparsity))
            lines.append(f"| {method} | {sparsity} | {'' if shot is None else f'{shot:.{digits}f}'} | "
                         + " | ".join(cells) + " |")
    lines += ["", "One-shot ordering (SparseGPT, Wanda, magnitude):", ""]
    for sparsity in SPARSITIES:
        found = {m: oneshot[(m, sparsity)] for m in METHODS if (m, sparsity) in oneshot}
        lines.append(f"- {sparsity}: {ordering(found, higher)}")
    lines += ["", "HAM against no HAM (95% interval):", ""]
    lines += [f"- {v}" for v in verdicts] or ["- no paired recovery yet"]
    return lines + [""]


def write_table(csv_path: Path, out: Path) -> Path:
    """``out/table.md`` from the rows of ``csv_path``; returns the file."""
    rows = read_rows(Path(csv_path))
    lines = ["# One-shot pruning and recovery on pretrained subjects", "",
             f"From `{csv_path}`; generated by `python -m sparseham.analysis.pretrained_study table`. "
             "Recovery arms: mean ± std over seeds (n seeds); differences paired by seed.", ""]
    subjects = [s for s in METRICS if any(r["subject"] == s for r in rows)]
    for subject in subjects:
        for metric, higher, digits in METRICS[subject]:
            lines += _section(rows, subject, metric, higher, digits)
    if not subjects:
        lines += ["No finished cells yet.", ""]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "table.md"
    path.write_text("\n".join(lines))
    return path
