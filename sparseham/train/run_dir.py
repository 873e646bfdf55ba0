"""The run directory: one process at a time, refuse to mix runs, skip finished ones, reconcile and
write ``final.json``.

Rank 0 holds an exclusive ``fcntl.flock`` on ``RUN/.lock`` for the whole run: a second process on
the same directory stops with exit status 2 and the holder's PID, and a lock left by a killed
process never blocks, because the kernel drops it with the process. Files that decide what a
re-run does (``config.yaml``, ``final.json``) are written atomically, so a kill while writing them
leaves the old file or none, never a torn one.
"""

from __future__ import annotations

import fcntl
import functools
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml

from sparseham.config import Config, ConfigError, config_to_dict
from sparseham.masks import MaskInvariantError
from sparseham.train.final import final_problem
from sparseham.train.logger import perplexity

__all__ = ["prepare_run_dir", "final_summary", "check_final_sparsity", "write_atomic", "RunDirError",
           "RunLock", "config_difference", "strict_json", "RESUMABLE"]

# Keys that may change between invocations of the same run without changing the run: where it is
# written and logged, how it is checkpointed, on which device and with how many loader workers,
# and how long it trains (to extend it). A run stopped by a non-finite loss is resumed with
# train.on_nonfinite=skip, as the stop message suggests.
RESUMABLE = {
    ("experiment", "out_dir"),
    ("experiment", "name"),
    ("checkpoint",),
    ("logging",),
    ("data", "num_workers"),
    ("data", "root"),
    ("train", "on_nonfinite"),
    ("train", "device"),
    ("train", "epochs"),
    ("train", "max_steps"),
    ("train", "eval_every"),
}
# How far a method may end from its target: STR's projection rounds, and in dense training the
# zeros are weights that happen to be exactly 0. Masking methods are held to exact counts anyway.
SPARSITY_TOLERANCE = 0.01


class RunDirError(ConfigError):
    """``--out`` points at a directory that holds a different run."""


@functools.cache
def _defaults() -> dict[str, Any]:
    from sparseham.config.schema import Config

    return config_to_dict(Config())


def _default(path: tuple) -> Any:
    value: Any = _defaults()
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def config_difference(old: Any, new: Any, path: tuple = ()) -> str | None:
    """The first key where two resolved configs differ, outside :data:`RESUMABLE`, as
    ``"key: OLD there, NEW now"``; ``None`` when they describe the same run. A key the old config
    lacks is no difference when the new one has its default: a run saved before the key existed
    resumes under a version that added it (``data.text.tokenizer``, ``distill``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if path + (key,) in RESUMABLE:
                continue
            if key not in old and new[key] == _default(path + (key,)):
                continue
            diff = config_difference(old.get(key), new.get(key), path + (key,))
            if diff:
                return diff
        return None
    return None if old == new else f"{'.'.join(map(str, path))}: {old!r} there, {new!r} now"


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float as ``None``, so ``json.dumps(allow_nan=False)`` gives
    strict JSON (a bare ``NaN`` is not JSON; other readers reject it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: a temporary file, fsync, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # ENAMETOOLONG: a path the file system cannot hold does not exist
        return False


def check_run_path(run_dir: Path) -> None:
    """Refuse, before anything is created, a run directory this file system cannot hold: a path
    onto an existing file, or a name longer than the file system allows.

    Raises:
        RunDirError: the reason and what to change, in one line.
    """
    parent = next(p for p in run_dir.absolute().parents if _exists(p))
    try:
        name_max, path_max = os.pathconf(parent, "PC_NAME_MAX"), os.pathconf(parent, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    longest = max(run_dir.absolute().parts, key=lambda part: len(os.fsencode(part)))
    if len(os.fsencode(longest)) > name_max:
        raise RunDirError(f"the run directory's name {longest[:40]}... has {len(os.fsencode(longest))} "
                          f"bytes, more than the {name_max} this file system allows; shorten "
                          "experiment.name or --out")
    # Room for the longest file a run writes inside it (a checkpoint's temporary name).
    if len(os.fsencode(str(run_dir.absolute()))) + 40 > path_max:
        raise RunDirError(f"the run directory's path is longer than this file system's {path_max} "
                          "bytes allow; choose a shorter --out")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir} is a file, not a run directory; choose another --out")


def prepare_run_dir(run_dir: Path, cfg: Config, *, force: bool = False) -> bool:
    """Create ``run_dir`` or check that it holds this same run. Returns False when it is finished.

    With ``force``, a directory holding another run is renamed aside (nothing is deleted).
    """
    saved = run_dir / "config.yaml"
    if saved.exists():
        try:
            old = yaml.safe_load(saved.read_text()) or {}
        except yaml.YAMLError:
            old = {}
        diff = config_difference(old, config_to_dict(cfg))
        if diff and not force:
            raise RunDirError(
                f"{run_dir} holds a run with a different config ({diff}); "
                "choose another --out, or pass --force to move the old run aside"
            )
        fresh = cfg.checkpoint.resume == "never" and any(run_dir.glob("checkpoint*.pt"))
        if (diff or fresh) and _is_main():  # --force, or a restart over a run: nothing is deleted
            aside = _aside(run_dir)
            run_dir.rename(aside)
            print(f"moved the previous run to {aside}", flush=True)
        elif (run_dir / "final.json").exists():
            problem = final_problem(run_dir / "final.json")
            if problem is None:
                print(f"{run_dir} is already finished (final.json exists); nothing to do", flush=True)
                return False
            print(f"warning: {run_dir / 'final.json'} is damaged ({problem}); finishing the run again "
                  "from its last checkpoint to rewrite it", flush=True)
    if _is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    return True


class RunLock:
    """An exclusive ``fcntl.flock`` on ``RUN/.lock``, held until :meth:`release` or process exit.

    Raises:
        RunDirError: another live process holds it (the message names its PID).
    """

    NAME = ".lock"

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / self.NAME
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise RunDirError(f"{run_dir} is in use by another training process (PID {holder}); "
                              "wait for it to finish, or choose another --out") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None


def _aside(run_dir: Path) -> Path:
    """A new name beside ``run_dir`` for the run it holds (``DIR.replaced-<time>[-N]``)."""
    stamp = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    candidate, n = stamp, 1
    while candidate.exists():
        n += 1
        candidate = stamp.with_name(f"{stamp.name}-{n}")
    return candidate


def check_final_sparsity(manager) -> float:
    """Reconcile the achieved sparsity with what the method promised, and return it.

    A masking method must keep exactly the per-layer counts it asked for
    (:meth:`MaskManager.verify`), and every method must end within :data:`SPARSITY_TOLERANCE` of
    its target (0 for dense training), except STR's ``mode: free``, which ends wherever its
    thresholds took it.

    Raises:
        MaskInvariantError: the masks or weights drifted from the promise.
    """
    manager.verify()
    achieved, method = manager.sparsity(), manager.method
    if getattr(method.options, "mode", "target") == "free":
        return achieved
    promised = method.promised_sparsity(manager)
    if abs(achieved - promised) > SPARSITY_TOLERANCE:
        raise MaskInvariantError(
            f"training ended at sparsity {achieved:.4f}, but method '{method.name}' promised "
            f"{promised:.4f} (within {SPARSITY_TOLERANCE}); masks or weights drifted, a bug: "
            "report it with the run's config.yaml"
        )
    return achieved


def final_summary(trainer, results: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """The contents of ``final.json`` (see DESIGN.md's run-directory contract)."""
    cfg, mm = trainer.cfg, trainer.mm
    sparsity = mm.layer_sparsity()
    flips = mm.tracker.read() if mm.tracker is not None else {}
    layers = {}
    for name, p in zip(mm.names, mm.params):
        f = flips.get(name, {})
        layers[name] = {
            "shape": list(p.shape),
            "numel": p.numel(),
            "sparsity": sparsity[name],
            "flips_masked": f.get("masked", 0),
            "flips_unmasked": f.get("unmasked", 0),
        }
    numel = sum(p.numel() for p in mm.params)
    summary = {
        "test_acc": results["test"][1],
        "test_loss": results["test"][0],
        "val_acc": results["val"][1] if "val" in results else None,
        "sparsity": mm.sparsity(),
        "zero_fraction": float(mm.zeros().sum()) / sum(p.numel() for p in mm.params),
        "target": cfg.sparsity.target or 0.0,
        "steps": trainer.step,
        "epochs": trainer.step / trainer.steps_per_epoch,
        "skipped_steps": trainer.skipped,
        "wall_time_s": trainer.logger.wall_time(),
        "method": cfg.sparsity.method,
        "distribution": mm.method.distribution,  # resolved: the method's default when null
        "method_summary": mm.method.summary(),
        "ham": {
            "enabled": cfg.ham.enabled,
            "alpha": cfg.ham.alpha,
            "beta": cfg.ham.beta,
            "sign": cfg.ham.sign,
            "clamp": cfg.ham.clamp,
            **trainer.logger.health.summary(),
        },
        "lr": cfg.optim.lr,
        "optimizer": cfg.optim.name,
        "seed": cfg.experiment.seed,
        "dataset": cfg.data.dataset,
        "model": cfg.model.name,
        "flips_masked": sum(f["masked"] for f in flips.values()),
        "flips_unmasked": sum(f["unmasked"] for f in flips.values()),
        "ever_flipped_frac": sum(f["ever_flipped"] for f in flips.values()) / numel if flips else None,
        "differs_from_init_frac": sum(f["differs_from_init"] for f in flips.values()) / numel
        if flips
        else None,
        "layers": layers,
        "config": config_to_dict(cfg),
        "finished": True,
    }
    if cfg.data.dataset == "text":  # per-token figures of a language model
        summary["test_perplexity"] = perplexity(results["test"][0])
        summary["val_perplexity"] = perplexity(results["val"][0]) if "val" in results else None
        # Over the whole run, evaluations included.
        tokens = trainer.step * cfg.data.batch_size * cfg.data.text.seq_len * cfg.train.grad_accum
        summary["tokens_per_s"] = tokens / max(trainer.logger.wall_time(), 1e-9)
    return summary
