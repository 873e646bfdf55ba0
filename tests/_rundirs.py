"""Writes fake but realistic run directories for the analysis tests.

The files follow the run-directory contract of ``train.py`` (config.yaml, metrics.jsonl,
signflips.jsonl, final.json); the numbers are made up but consistent: final.json's flip
totals are the sums of the signflips.jsonl intervals, and "ever flipped" never decreases.
Used by tests/test_report.py and tests/test_sweep.py until the real trainer exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

__all__ = ["LENET300", "config", "many_layers", "write_run"]

LENET300 = {"fc1.weight": (300, 784), "fc2.weight": (100, 300), "fc3.weight": (10, 100)}
STEPS_PER_EPOCH = 100
HIST_BINS = 8


def many_layers(n: int) -> dict[str, tuple[int, ...]]:
    """``n`` conv layers of varying size, named like a deep ResNet."""
    return {f"layer{i // 10}.{i % 10}.conv.weight": (16 * (1 + i % 4), 16, 3, 3) for i in range(n)}


def config(method: str = "rigl", ham: bool = False, seed: int = 0, target: float = 0.9,
           out_dir: str = "runs/x", **extra) -> dict:
    """A resolved config as train.py writes it; ``extra`` maps dotted keys to values."""
    cfg = {
        "experiment": {"name": method + "_ham" * ham, "seed": seed, "out_dir": out_dir},
        "data": {"dataset": "fashion_mnist", "root": "data", "batch_size": 128, "num_workers": 0,
                 "download": False},
        "model": {"name": "lenet300"},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                  "nesterov": False, "schedule": {"name": "cosine", "warmup_epochs": 0}},
        "ham": {"enabled": ham, "alpha": 200.0, "beta": 1e-3, "sign": "half_step", "clamp": 5.0,
                "fused": False},
        "sparsity": {"method": method, "target": target, "distribution": "erk", "init": "random",
                     "dense_layers": [], "exclude": [], "update_every": 100},
        "tracking": {"sign_flips": True, "interval": 50, "per_weight": False},
        "train": {"epochs": 4, "max_steps": None, "eval_every": 1, "device": "cpu", "amp": "none",
                  "compile": False},
        "logging": {"tensorboard": True, "log_every": 25, "histograms_every": 0},
        "checkpoint": {"every": 1, "keep": 1, "resume": "auto"},
    }
    for dotted, value in extra.items():
        *parents, leaf = dotted.split(".")
        node = cfg
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return cfg


def _flip_records(rng, layers, target, ham, records, interval, hist):
    ever = {name: 0 for name in layers}
    out = []
    for t in range(1, records + 1):
        step = t * interval
        rec = {"step": step, "epoch": step / STEPS_PER_EPOCH, "steps": interval, "layers": {}}
        for name, shape in layers.items():
            numel = _numel(shape)
            active = round(numel * (1 - target))
            # HAM pushes small weights towards zero, so fewer of them cross it.
            unmasked = int(rng.poisson(active * (0.004 if ham else 0.012) * interval / t))
            masked = int(rng.poisson((numel - active) * 0.0004 * interval / t))
            ever[name] = min(numel, ever[name] + (masked + unmasked) // 2)
            rec["layers"][name] = {"numel": numel, "active": active, "masked": masked,
                                   "unmasked": unmasked, "ever_flipped": ever[name],
                                   "differs_from_init": int(ever[name] * 0.6)}
        if hist:
            rec["hist"] = {name: _hist(_numel(shape), ever[name]) for name, shape in layers.items()}
        out.append(rec)
    return out


def _numel(shape) -> int:
    """Number of elements of a tensor of ``shape``."""
    return int(np.prod(shape))


def _hist(numel: int, ever: int) -> list[int]:
    counts = [numel - ever]
    left = ever
    for _ in range(HIST_BINS - 2):
        counts.append(left // 2)
        left -= left // 2
    return counts + [left]


def _metrics(rng, layers, method, target, steps, test_acc):
    # Events the report does not use must be ignored, so the fake logs them too.
    events = [{"event": "start", "step": 0, "epoch": 0.0},
              {"event": "sparsity", "step": 0, "target": target, "achieved": target}]
    for step in range(25, steps + 1, 25):
        frac = step / steps
        events.append({"event": "train", "step": step, "epoch": step / STEPS_PER_EPOCH,
                       "loss": 2.3 * (1 - 0.8 * frac) + rng.normal(0, 0.02),
                       "acc": 0.3 + 0.6 * frac, "lr": 0.1 * (1 - frac), "sparsity": target,
                       "samples_per_s": 5000.0, "time_s": step * 0.05})
        if method in ("rigl", "set") and step % 100 == 0:
            events.append({"event": "mask", "step": step, "epoch": step / STEPS_PER_EPOCH,
                           "global_sparsity": target, "sparsity": dict.fromkeys(layers, target),
                           "churn": {n: int(_numel(s) * 0.01 / frac) for n, s in layers.items()},
                           "phase": None})
        if step % STEPS_PER_EPOCH == 0:
            acc = test_acc - 0.1 * (1 - frac)
            for split, shift in (("val", -0.005), ("test", 0.0)):
                events.append({"event": "eval", "step": step, "epoch": step / STEPS_PER_EPOCH,
                               "split": split, "loss": 1.4 - acc, "acc": acc + shift})
    return events


def _final(cfg, flips, steps, test_acc, layers) -> dict:
    totals = {n: [sum(r["layers"][n][k] for r in flips) for k in ("masked", "unmasked")]
              for n in layers}
    last = flips[-1]["layers"]
    numel = sum(_numel(s) for s in layers.values())
    target = cfg["sparsity"]["target"]
    return {
        "test_acc": test_acc, "test_loss": 0.4 + (1 - test_acc), "val_acc": test_acc - 0.005,
        "sparsity": target, "target": target, "steps": steps, "epochs": steps / STEPS_PER_EPOCH,
        "wall_time_s": steps * 0.05 + 1.25, "method": cfg["sparsity"]["method"],
        "ham": {k: cfg["ham"][k] for k in ("enabled", "alpha", "beta")},
        "lr": cfg["optim"]["lr"], "seed": cfg["experiment"]["seed"],
        "dataset": cfg["data"]["dataset"], "model": cfg["model"]["name"],
        "flips_masked": sum(t[0] for t in totals.values()),
        "flips_unmasked": sum(t[1] for t in totals.values()),
        "ever_flipped_frac": sum(v["ever_flipped"] for v in last.values()) / numel,
        "differs_from_init_frac": sum(v["differs_from_init"] for v in last.values()) / numel,
        "layers": {n: {"shape": list(s), "numel": _numel(s), "sparsity": target,
                       "flips_masked": totals[n][0], "flips_unmasked": totals[n][1]}
                   for n, s in layers.items()},
        "finished": True,
    }


def _write_jsonl(path: Path, records: list[dict], truncate: bool) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if truncate:
        # A run killed mid-write leaves half a record and no newline.
        text += json.dumps(records[-1])[: len(json.dumps(records[-1])) // 2]
    path.write_text(text)


def write_run(path: Path, *, layers: dict | None = None, method: str = "rigl", ham: bool = False,
              seed: int = 0, target: float = 0.9, records: int = 8, hist: bool = False,
              final: bool = True, signflips: bool = True, test_acc: float = 0.88,
              truncate: bool = False, extra: dict | None = None) -> Path:
    """Writes a run directory and returns its path.

    Args:
        path: the directory (created).
        layers: layer name -> weight shape; LeNet-300-100 by default.
        method, ham, seed, target: the config values of the run.
        records: number of signflips.jsonl records (50 steps each, 100 steps per epoch).
        hist: add per-weight flip-count histograms to the records.
        final: write final.json (False: a run in progress).
        signflips: write signflips.jsonl.
        test_acc: final test accuracy.
        truncate: end both jsonl files with half a record, as a killed run does.
        extra: more config values, dotted key -> value.
    """
    layers = layers or LENET300
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 100 * ham)
    cfg = config(method, ham, seed, target, out_dir=str(path), **(extra or {}))
    steps = records * 50
    (path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    _write_jsonl(path / "metrics.jsonl", _metrics(rng, layers, method, target, steps, test_acc),
                 truncate)
    flips = _flip_records(rng, layers, target, ham, records, 50, hist)
    if signflips:
        _write_jsonl(path / "signflips.jsonl", flips, truncate)
    if final:
        (path / "final.json").write_text(json.dumps(_final(cfg, flips, steps, test_acc, layers)))
    return path
