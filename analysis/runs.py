"""Reading run directories written by ``sparseham train`` (config.yaml, metrics.jsonl,
signflips.jsonl, final.json), the only input of ``analysis/``, and comparing runs: grouping
by seed (:func:`group_by_seed`) and mean ± std (:func:`fmt_stat`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from sparseham.train.final import final_fields_problem

__all__ = [
    "FlipSeries", "Run", "RunError", "SEED_FREE_KEYS", "flatten", "flip_series", "fmt_stat",
    "group_by_seed", "group_labels", "load_run", "mean_std", "read_jsonl", "short_keys",
    "summary", "value_text", "varying_keys",
]

# Keys that name or place a run but do not change what it computes.
SEED_FREE_KEYS = ("experiment.seed", "experiment.out_dir", "experiment.name")


class RunError(ValueError):
    """A path is not a readable run directory; the message is one line naming the path."""


def read_jsonl(path: Path) -> tuple[list[dict], bool]:
    """Reads a JSON-lines file: the records, and whether a truncated last line was dropped.

    Raises:
        RunError: a line other than the last (a killed run may cut it) is not a JSON object.
    """
    lines = [(i, ln) for i, ln in enumerate(path.read_text().splitlines(), 1) if ln.strip()]
    records = []
    for pos, (lineno, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if pos == len(lines) - 1:
                return records, True
            raise RunError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise RunError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records, False


@dataclass
class Run:
    """One run directory, read.

    Attributes:
        path: the directory; config: config.yaml.
        metrics: every metrics.jsonl record, unknown events included.
        flips: the signflips.jsonl records; final: final.json, or None while in progress.
        notes: what the reader had to work around (truncated lines).
    """

    path: Path
    config: dict
    metrics: list[dict]
    flips: list[dict]
    final: dict | None
    notes: list[str] = field(default_factory=list)

    @property
    def in_progress(self) -> bool:
        """True when ``final.json`` is missing."""
        return self.final is None

    def events(self, kind: str) -> list[dict]:
        """The ``metrics.jsonl`` records whose ``event`` is ``kind``, in file order."""
        return [m for m in self.metrics if m.get("event") == kind]


def _mapping(path: Path, loads) -> dict:
    try:
        value = loads(path.read_text())
    except (ValueError, yaml.YAMLError) as err:
        raise RunError(f"{path}: unreadable ({str(err).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise RunError(f"{path}: expected a mapping, got {type(value).__name__}")
    return value


def load_run(path: Path | str, *, require_flips: bool = True) -> Run:
    """Reads a run directory; ``final`` is None while the run is in progress.

    Raises:
        RunError: config.yaml or metrics.jsonl is missing or unreadable, or there are no
            sign-flip records and ``require_flips`` is set.
    """
    path = Path(path)
    for name in ("config.yaml", "metrics.jsonl"):
        if not (path / name).is_file():
            raise RunError(f"{path}: not a run directory (no {name})")
    run = Run(path, _mapping(path / "config.yaml", yaml.safe_load), [], [], None)
    for name, attr in (("metrics.jsonl", "metrics"), ("signflips.jsonl", "flips")):
        if (path / name).is_file():
            records, truncated = read_jsonl(path / name)
            setattr(run, attr, records)
            if truncated:
                run.notes.append(f"the truncated last line of {name} was skipped")
    if require_flips and not run.flips:
        raise RunError(f"{path}: no sign-flip data (signflips.jsonl is missing or empty)")
    if (path / "final.json").is_file():
        try:
            run.final = _mapping(path / "final.json", json.loads)
            problem = final_fields_problem(run.final)
        except RunError as err:
            problem = str(err).removeprefix(f"{path / 'final.json'}: ")
        if problem:
            raise RunError(f"{path / 'final.json'}: {problem}; the file is damaged, re-run the same command "
                           "to rewrite it")
    # Records without an epoch (hand-edited, or from another tool) get it from their step.
    per_epoch = next((m.get("steps_per_epoch") for m in run.metrics if m.get("event") == "start"), None)
    run.metrics = [m for m in run.metrics if _placed(m, per_epoch)]
    return run


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _placed(record: dict, per_epoch) -> bool:
    """Give ``record`` an epoch from its step when it lacks one; False when it has neither."""
    if record.get("event") in ("train", "eval", "sparsity", "mask") and not _is_number(record.get("epoch")):
        if not (_is_number(record.get("step")) and _is_number(per_epoch) and per_epoch):
            return False
        record["epoch"] = record["step"] / per_epoch
    return True


@dataclass
class FlipSeries:
    """Sign-flip records as arrays: one row per tracker interval, one column per layer.

    Attributes:
        epoch, span: the epoch at the end of each interval and the epochs it covers, (T,).
        layers: layer names, in order of first appearance.
        numel, active, masked, unmasked, ever, differs: shape (T, L), as in signflips.jsonl.
    """

    epoch: np.ndarray
    span: np.ndarray
    layers: list[str]
    numel: np.ndarray
    active: np.ndarray
    masked: np.ndarray
    unmasked: np.ndarray
    ever: np.ndarray
    differs: np.ndarray


def flip_series(records: Sequence[dict]) -> FlipSeries:
    """Turns ``signflips.jsonl`` records (at least one, in file order) into arrays.

    A layer missing from a record counts 0 there. The first interval starts at epoch
    ``E·(S−n)/S`` (its end epoch scaled back by its ``n`` steps), later ones at the previous
    record's epoch.
    """
    layers = list(dict.fromkeys(name for r in records for name in r.get("layers", {})))
    keys = ("numel", "active", "masked", "unmasked", "ever_flipped", "differs_from_init")
    table = np.zeros((len(keys), len(records), len(layers)))
    for t, rec in enumerate(records):
        for j, name in enumerate(layers):
            stats = rec.get("layers", {}).get(name, {})
            table[:, t, j] = [stats.get(k, 0) for k in keys]
    # numel never changes; a record that lacks a layer must not make its rates divide by 0.
    table[0] = table[0].max(axis=0, keepdims=True)
    step = np.array([float(r.get("step", 0)) for r in records])
    epoch = np.array([float(r.get("epoch", 0.0)) for r in records])
    n = np.array([float(r.get("steps", 0)) for r in records])
    start = epoch[0] * (step[0] - n[0]) / step[0] if step[0] > 0 else 0.0
    span = np.diff(epoch, prepend=start)
    return FlipSeries(epoch, span, layers, *table)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def summary(run: Run) -> dict:
    """The final.json fields of a run, plus ``total_flips`` and ``flip_rate``.

    Finished runs keep final.json's values unchanged; runs in progress get them from the last
    jsonl records (None where unknown). ``flip_rate`` is (masked + unmasked flips) per 1,000
    weights per epoch over the whole run.
    """
    out = dict(run.final) if run.final else _partial_summary(run)
    out["total_flips"] = (out.get("flips_masked") or 0) + (out.get("flips_unmasked") or 0)
    numel = sum(layer.get("numel", 0) for layer in (out.get("layers") or {}).values())
    if not numel and run.flips:
        numel = sum(s.get("numel", 0) for s in run.flips[-1].get("layers", {}).values())
    out["flip_rate"] = _ratio(out["total_flips"] * 1000.0, numel * (out.get("epochs") or 0.0))
    return out


def _partial_summary(run: Run) -> dict:
    """Like final.json, from the jsonl files of a run that has not finished."""
    last = {kind: (run.events(kind) or [{}])[-1] for kind in ("train", "mask")}
    evals = run.events("eval")
    test, val = (([e for e in evals if e.get("split") == s] or [{}])[-1] for s in ("test", "val"))
    progress = [r for r in (last["train"], run.flips[-1] if run.flips else {}) if "step" in r]
    latest = max(progress, key=lambda r: r["step"], default={})
    out = {
        "test_acc": test.get("acc"), "test_loss": test.get("loss"), "val_acc": val.get("acc"),
        "sparsity": last["mask"].get("global_sparsity", last["train"].get("sparsity")),
        "wall_time_s": last["train"].get("time_s"),
        "steps": latest.get("step"), "epochs": latest.get("epoch"),
    }
    if run.flips:
        fs = flip_series(run.flips)
        out["flips_masked"] = int(fs.masked.sum())
        out["flips_unmasked"] = int(fs.unmasked.sum())
        total = fs.numel[-1].sum()
        out["ever_flipped_frac"] = _ratio(fs.ever[-1].sum(), total)
        out["differs_from_init_frac"] = _ratio(fs.differs[-1].sum(), total)
    return out


def flatten(config: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _seed_key(config: dict) -> str:
    flat = {k: v for k, v in flatten(config).items() if k not in SEED_FREE_KEYS}
    return json.dumps(flat, sort_keys=True, default=str)


def group_by_seed(configs: Sequence[dict]) -> list[list[int]]:
    """Lists of indices of ``configs`` that are equal once seed, out_dir and name are removed."""
    groups: dict[str, list[int]] = {}
    for i, config in enumerate(configs):
        groups.setdefault(_seed_key(config), []).append(i)
    return list(groups.values())


_GENERIC = {"enabled", "name"}


def short_keys(keys: Sequence[str], *, readable: bool = False) -> dict[str, str]:
    """Maps each dotted key to its shortest unique suffix: ``sparsity.method`` -> ``method``.

    ``readable`` keeps the section of keys whose last part says nothing alone (``ham.enabled``,
    ``model.name``); labels use it, sweep run names do not (they must stay stable).
    """
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(2 if readable and parts[-1] in _GENERIC else 1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if sum(k == suffix or k.endswith("." + suffix) for k in keys) == 1:
                break
        out[key] = suffix
    return out


def varying_keys(configs: Sequence[dict]) -> list[str]:
    """Dotted config keys whose value differs between configs, seed/out_dir/name excluded."""
    flats = [flatten(c) for c in configs]
    keys = dict.fromkeys(k for f in flats for k in f if k not in SEED_FREE_KEYS)
    seen = [{json.dumps(f[k], default=str) if k in f else None for f in flats} for k in keys]
    return [k for k, values in zip(keys, seen) if len(values) > 1]


def value_text(value: object) -> str:
    """A config value as YAML reads it back: ``rigl``, ``true``, ``null``, ``1.0e-05``, ``"1"``."""
    text = json.dumps(value, default=str)
    if isinstance(value, float) and "e" in text and "." not in text:
        return text.replace("e", ".0e")  # PyYAML reads 1e-05 as a string, 1.0e-05 as a float
    try:
        plain = isinstance(value, str) and yaml.safe_load(value) == value
    except yaml.YAMLError:
        plain = False
    # JSON is YAML too, and quotes the strings that YAML would read as something else.
    return value if plain else text


def group_labels(configs: Sequence[dict], fallback: str) -> list[str]:
    """Names configs by the values that differ between them, e.g. ``method=rigl, enabled=true``.

    Args:
        configs: one config per group of seeds.
        fallback: the name of every config when no value differs (one group).
    """
    keys = varying_keys(configs)
    if not keys:
        return [fallback] * len(configs)
    short = short_keys(keys, readable=True)
    flats = [flatten(c) for c in configs]
    return [", ".join(f"{short[k]}={value_text(f.get(k))}" for k in keys) for f in flats]


def _present(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; 0 for one value) and n, ignoring None/NaN."""
    vals = np.array(_present(values), dtype=float)
    if vals.size == 0:
        return math.nan, math.nan, 0
    std = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
    return float(vals.mean()), std, int(vals.size)


def fmt_stat(values: Sequence[float | None], digits: int) -> str:
    """Formats one value as is (integers exactly) and several as ``mean ± std``; none as "—"."""
    present = _present(values)
    if len(present) == 1:
        value = present[0]
        return str(value) if isinstance(value, int) else f"{value:.{digits}f}"
    mean, std, n = mean_std(present)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n else "—"
