"""Figures for the sign-flip report.

Figures are built without pyplot, so importing this module changes no global backend and
nothing needs closing: ``Figure.savefig`` renders PNGs with Agg.

Every per-layer axis draws at most ``top_k`` layers (the ones with the most flips over the
run) plus one black "all layers" aggregate, so models with 50+ layers stay readable. The
x axis is always the epoch; rates are per 1,000 weights per epoch (see :func:`rate`).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from sparseham.analysis.runs import FlipSeries, Run, flip_series

__all__ = ["compare_figure", "rate", "run_figures", "top_layers"]

RATE_LABEL = "flips / 1,000 weights / epoch"
_AGG = {"color": "black", "lw": 2.2, "label": "all layers"}


def rate(flips: np.ndarray, weights: np.ndarray, span: np.ndarray) -> np.ndarray:
    """Flips per 1,000 weights per epoch; NaN where there are no weights or no epochs.

    Args:
        flips: flips counted in each interval, shape (T,) or (T, L).
        weights: the weights they are counted among, same shape.
        span: epochs covered by each interval, shape (T,).
    """
    span = span.reshape(-1, *([1] * (flips.ndim - 1)))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = flips * 1000.0 / (weights * span)
    return np.where(np.isfinite(out) & (weights > 0), out, np.nan)


def top_layers(fs: FlipSeries, k: int) -> list[int]:
    """Indices of the ``k`` layers with the most flips (masked + unmasked) over the run."""
    totals = (fs.masked + fs.unmasked).sum(axis=0)
    return [int(j) for j in np.argsort(-totals, kind="stable")[:k]]


def _short(name: str, width: int = 30) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _color(rank: int, k: int):
    cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
    return cmap(rank % cmap.N)


def _figure(ncols: int, title: str, nrows: int = 1) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(4.6 * ncols + 2.4, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    fig.suptitle(title, fontsize="medium")
    return fig, axes.ravel()


def _layer_axis(ax, x, values, agg, names: Sequence[str], idx: Sequence[int], ylabel: str):
    """Draws the top layers in ``idx`` (columns of ``values``) and the aggregate ``agg``."""
    style = {"marker": "o", "ms": 3} if len(x) < 25 else {}
    for rank, j in enumerate(idx):
        ax.plot(x, values[:, j], color=_color(rank, len(idx)), lw=1.2, label=_short(names[j]),
                **style)
    ax.plot(x, agg, **_AGG, **style)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _legend(fig: Figure, ax) -> None:
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize="small")


def _flip_rate(fs: FlipSeries, idx: list[int], title: str) -> Figure:
    fig, axes = _figure(3, f"{title}: sign-flip rate per interval")
    parts = [
        ("masked weights (per 1,000 masked)", fs.masked, fs.numel - fs.active),
        ("unmasked weights (per 1,000 unmasked)", fs.unmasked, fs.active),
        ("all weights (per 1,000 weights)", fs.masked + fs.unmasked, fs.numel),
    ]
    for ax, (name, flips, weights) in zip(axes, parts):
        agg = rate(flips.sum(1), weights.sum(1), fs.span)
        _layer_axis(ax, fs.epoch, rate(flips, weights, fs.span), agg, fs.layers, idx, RATE_LABEL)
        ax.set_title(name, fontsize="small")
    _legend(fig, axes[0])
    return fig


def _cumulative(fs: FlipSeries, idx: list[int], title: str) -> Figure:
    fig, axes = _figure(2, f"{title}: cumulative sign flips")
    for label, flips in (("masked", fs.masked), ("unmasked", fs.unmasked)):
        axes[0].plot(fs.epoch, np.cumsum(flips.sum(1)), lw=1.6, label=f"{label} (all layers)")
    axes[0].plot(fs.epoch, np.cumsum((fs.masked + fs.unmasked).sum(1)), **{**_AGG,
                 "label": "masked + unmasked"})
    axes[0].set(xlabel="epoch", ylabel="flips (cumulative count)")
    axes[0].set_title("all layers", fontsize="small")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    total = np.cumsum(fs.masked + fs.unmasked, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_k = 1000.0 * total / fs.numel
        agg = 1000.0 * total.sum(1) / fs.numel.sum(1)
    _layer_axis(axes[1], fs.epoch, per_k, agg, fs.layers, idx, "cumulative flips / 1,000 weights")
    axes[1].set_title("per layer", fontsize="small")
    _legend(fig, axes[1])
    return fig


def _fractions(fs: FlipSeries, idx: list[int], title: str) -> Figure:
    fig, axes = _figure(2, f"{title}: weights whose sign changed")
    for ax, counts, name in ((axes[0], fs.ever, "flipped at least once since the start"),
                             (axes[1], fs.differs, "sign differs from the start")):
        with np.errstate(divide="ignore", invalid="ignore"):
            frac, agg = counts / fs.numel, counts.sum(1) / fs.numel.sum(1)
        _layer_axis(ax, fs.epoch, frac, agg, fs.layers, idx, "fraction of weights")
        ax.set_title(name, fontsize="small")
    _legend(fig, axes[0])
    return fig


def _histogram(hist: dict[str, list[int]], names: list[str], title: str) -> Figure:
    bins = max(len(h) for h in hist.values())
    counts = {n: np.pad(np.asarray(h, float), (0, bins - len(h))) for n, h in hist.items()}
    fig, axes = _figure(1, f"{title}: per-weight flip counts (last record)")
    ax, x = axes[0], np.arange(bins)
    total = sum(counts.values())
    ax.bar(x, total / max(total.sum(), 1), color="0.75", label="all layers")
    for rank, name in enumerate(n for n in names if n in counts):
        ax.plot(x, counts[name] / max(counts[name].sum(), 1), drawstyle="steps-mid",
                color=_color(rank, len(names)), label=_short(name))
    ax.set_xticks(x, [str(i) for i in x[:-1]] + [f"≥{bins - 1}"])
    ax.set(yscale="log", xlabel="number of sign flips of a weight",
           ylabel="fraction of the layer's weights (log)")
    ax.grid(alpha=0.3)
    _legend(fig, ax)
    return fig


def _masks(events: list[dict], fs: FlipSeries, k: int, title: str) -> Figure:
    flips = dict(zip(fs.layers, (fs.masked + fs.unmasked).sum(axis=0)))
    numel = dict(zip(fs.layers, fs.numel[-1]))
    names = list(dict.fromkeys(n for e in events for n in e.get("sparsity", {})))
    names = sorted(names, key=lambda n: -flips.get(n, 0))[:k]
    x = np.array([float(e.get("epoch", 0.0)) for e in events])
    fig, axes = _figure(2, f"{title}: masks")
    sparsity = np.array([[e.get("sparsity", {}).get(n, np.nan) for n in names] for e in events])
    # Churn as a fraction of each layer's size, so that small and large layers share an axis.
    churn = np.array([[(e.get("churn") or {}).get(n, np.nan) / numel.get(n, np.nan) for n in names]
                      for e in events])
    every = [sum(c for n, c in (e.get("churn") or {}).items() if n in numel)
             / max(sum(numel[n] for n in (e.get("churn") or {}) if n in numel), 1) for e in events]
    glob = [e.get("global_sparsity", np.nan) for e in events]
    _layer_axis(axes[0], x, sparsity.reshape(len(x), -1), glob, names, range(len(names)),
                "sparsity (fraction of weights masked)")
    _layer_axis(axes[1], x, churn.reshape(len(x), -1), every, names, range(len(names)),
                "mask churn (fraction of weights)")
    axes[0].set_title("per-layer sparsity", fontsize="small")
    axes[1].set_title("mask churn: Hamming distance to the previous mask / layer size",
                      fontsize="small")
    _legend(fig, axes[0])
    return fig


def _curves(run: Run, title: str) -> Figure:
    fig, axes = _figure(2, f"{title}: loss and accuracy")
    train = run.events("train")
    evals = run.events("eval")
    for ax, key, unit in ((axes[0], "loss", "loss (cross-entropy)"),
                          (axes[1], "acc", "accuracy (fraction correct)")):
        ax.plot([e["epoch"] for e in train], [e.get(key) for e in train], lw=1, label="train")
        for split in dict.fromkeys(e.get("split", "eval") for e in evals):
            pts = [e for e in evals if e.get("split", "eval") == split]
            ax.plot([e["epoch"] for e in pts], [e.get(key) for e in pts], marker="o", ms=3,
                    lw=1.6, label=f"{split} (eval)")
        ax.set(xlabel="epoch", ylabel=unit)
        ax.grid(alpha=0.3)
    _legend(fig, axes[0])
    return fig


def run_figures(run: Run, label: str, top_k: int = 8) -> dict[str, Figure]:
    """All figures for one run, by file stem.

    Args:
        run: the run (with at least one sign-flip record).
        label: the run's name in titles.
        top_k: layers drawn per per-layer axis, besides the "all layers" aggregate.

    Returns:
        ``flip_rate``, ``cumulative``, ``fractions``, ``curves``, and ``histogram`` (when
        per-weight tracking was on) and ``masks`` (when masks changed).
    """
    fs = flip_series(run.flips)
    idx = top_layers(fs, top_k)
    figs = {
        "flip_rate": _flip_rate(fs, idx, label),
        "cumulative": _cumulative(fs, idx, label),
        "fractions": _fractions(fs, idx, label),
    }
    hists = [r["hist"] for r in run.flips if r.get("hist")]
    if hists:
        figs["histogram"] = _histogram(hists[-1], [fs.layers[j] for j in idx], label)
    if run.events("mask"):
        figs["masks"] = _masks(run.events("mask"), fs, top_k, label)
    figs["curves"] = _curves(run, label)
    return figs


def _test_points(run: Run) -> tuple[list[float], list[float]]:
    tests = [e for e in run.events("eval") if e.get("split") == "test"]
    return [e["epoch"] for e in tests], [e.get("acc") for e in tests]


def compare_figure(runs: Sequence[Run], groups: Sequence[int], labels: Sequence[str]) -> Figure:
    """Overlaid curves of several runs; runs of one seed group share a colour and a label.

    Runs in progress are dashed.

    Args:
        runs: the runs (each with at least one sign-flip record).
        groups: the group index of each run.
        labels: the legend label of each group.
    """
    fig, axes = _figure(2, "Run comparison", nrows=2)
    seen: set[int] = set()
    for run, group in zip(runs, groups):
        fs = flip_series(run.flips)
        style = {"color": _color(group, len(labels)), "lw": 1.4, "ls": "--" if run.in_progress
                 else "-", "label": None if group in seen else labels[group]}
        seen.add(group)
        numel = fs.numel.sum(1)
        axes[0].plot(fs.epoch, 1000.0 * np.cumsum((fs.masked + fs.unmasked).sum(1)) / numel,
                     **style)
        axes[1].plot(fs.epoch, fs.ever.sum(1) / numel, **style)
        axes[2].plot(*_test_points(run), marker="o", ms=3, **style)
        train = run.events("train")
        axes[3].plot([e["epoch"] for e in train], [e.get("loss") for e in train], **style)
    units = ["cumulative flips / 1,000 weights", "fraction of weights flipped at least once",
             "test accuracy (fraction correct)", "train loss (cross-entropy)"]
    for ax, unit in zip(axes, units):
        ax.set(xlabel="epoch", ylabel=unit)
        ax.grid(alpha=0.3)
    _legend(fig, axes[0])
    return fig
