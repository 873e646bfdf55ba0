"""The one place where training reads device values: metrics files, TensorBoard and progress.

Per step, :meth:`RunLogger.record_batch` only adds to device accumulators. Every
``logging.log_every`` steps, :meth:`RunLogger.log` copies them to the host together with the
sign-flip counters, the mask events and the manager's invariant check, and writes:

- ``metrics.jsonl``: ``train``, ``eval``, ``mask``, ``sparsity`` and ``start``/``end`` events;
- ``signflips.jsonl``: per layer, masked and unmasked flips during the interval;
- TensorBoard scalars, a custom-scalars layout (masked and unmasked flips of a layer on one
  chart), weight histograms and, at the end, an HParams entry;
- one progress line with ETA, loss, accuracy, sparsity and flips;
- HAM's diagnostics (``ham/clamped_fraction``, ``ham/capped``) and, once per run, a warning
  line when training goes bad (:mod:`sparseham.train.health`).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparseham import sharding
from sparseham.train.health import TrainingHealth

__all__ = ["RunLogger", "JsonlWriter", "perplexity", "truncate_jsonl"]


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop records after ``step`` (and torn or foreign lines): a resumed run rewrites them.

    A resumed run also writes its own ``start`` record at ``step``, so an earlier attempt's start
    there goes; and a run that starts over from step 0 (killed before its first checkpoint) keeps
    nothing of the attempt it repeats. The kept records go to a new file that then replaces the
    old one atomically, so a write that fails half-way (a full disk) leaves the whole history in
    place.
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        at = record.get("step", 0) if isinstance(record, dict) else None
        if not isinstance(at, (int, float)) or isinstance(at, bool) or at > step:
            continue
        if at < step or (step > 0 and record.get("event") != "start"):
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write("".join(f"{line}\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class JsonlWriter:
    """Append JSON objects, one per line, flushed so a reader sees whole records."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        if not self.path.exists():  # deleted under a running run: say so, and keep logging
            print(f"warning: {self.path} was deleted during the run; logging continues in a new file",
                  flush=True)
            self.file.close()
            self.file = open(self.path, "a", buffering=1)
        self.file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self.file.close()


def perplexity(loss: float) -> float:
    """``exp(loss)`` of a mean per-token cross-entropy in nats; ``inf`` past float range."""
    return math.exp(loss) if loss < 700 else math.inf


def _rate_text(rec: dict[str, Any]) -> str:
    if "tokens_per_s" in rec:
        return f"{rec['tokens_per_s']:,.0f} tokens/s"
    return f"{rec['samples_per_s']:.0f} samples/s"


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class RunLogger:
    """Writes a run directory's logs (rank 0 only; other ranks get ``enabled=False``)."""

    def __init__(self, run_dir: Path, manager, cfg, *, total_steps: int, steps_per_epoch: int,
                 start_step: int, enabled: bool = True) -> None:
        self.run_dir, self.manager, self.cfg = run_dir, manager, cfg
        self.total_steps, self.steps_per_epoch, self.enabled = total_steps, steps_per_epoch, enabled
        self.device = manager.params[0].device
        self._loss = torch.zeros((), device=self.device)
        self._correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self._seen = 0
        # Language modelling: rates in tokens, evaluations with their perplexity.
        self.seq_len = cfg.data.text.seq_len if cfg.data.dataset == "text" else 0
        self.last_step, self.last_flips = start_step, None
        self.wall_offset, self.t0, self.start_step = 0.0, time.perf_counter(), start_step
        names = {p: n for n, p in manager.model.named_parameters()}
        self.health = TrainingHealth(manager.optimizer, names, alpha_lr=cfg.ham.alpha * cfg.optim.lr,
                                     clamp=cfg.ham.clamp, max_norm=cfg.ham.max_norm)
        if not enabled:
            return
        for name in ("metrics.jsonl", "signflips.jsonl"):
            truncate_jsonl(run_dir / name, start_step)
        self.metrics = JsonlWriter(run_dir / "metrics.jsonl")
        self.flips = JsonlWriter(run_dir / "signflips.jsonl")
        self.tb = None
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir), purge_step=start_step or None)
            self._layout()

    # -- per step: device only ------------------------------------------------------------------
    def record_batch(self, loss: Tensor, logits: Tensor, targets: Tensor) -> None:
        n = targets.shape[0]
        self._loss += loss.detach().float() * n
        self._correct += (logits.detach().argmax(1) == targets).sum()
        self._seen += n

    def wall_time(self) -> float:
        return self.wall_offset + time.perf_counter() - self.t0

    def epoch(self, step: int) -> float:
        return step / self.steps_per_epoch

    # -- at log intervals: host reads -----------------------------------------------------------
    def log(self, step: int, lr: float) -> dict[str, Any]:
        """Read accumulators and counters, check invariants, write every sink."""
        self.manager.verify()
        loss, correct = torch.stack([self._loss, self._correct.float()]).tolist()
        n = max(self._seen, 1)
        elapsed = self.wall_time()
        seconds = max(time.perf_counter() - self.t0, 1e-9)
        rate = (step - self.start_step) * self.cfg.data.batch_size * self.cfg.train.grad_accum / seconds
        sparsity = self.manager.sparsity()
        rec = {"event": "train", "step": step, "epoch": self.epoch(step), "loss": loss / n,
               "acc": correct / n, "lr": lr, "sparsity": sparsity, "samples_per_s": rate, "time_s": elapsed}
        if self.seq_len:
            rec["tokens_per_s"] = rate * self.seq_len
        self._loss.zero_()
        self._correct.zero_()
        self._seen = 0
        # Every rank reads the counters: over sharded weights (FSDP) each read is a collective.
        layer = self.manager.layer_sparsity()
        tracker = self.manager.tracker
        now = tracker.read() if tracker is not None else None
        masks = self.manager.method.tracking_masks(self.manager) if now is not None else None
        active = None if masks is None else sharding.stack_counts([torch.count_nonzero(m) for m in masks])
        active = None if active is None else active.tolist()
        health = self.health.update(rec["loss"])  # HAM's counters too
        if not self.enabled:
            return rec
        self._health(step, rec, *health)
        self.metrics.write(rec)
        self._masks(step, layer, sparsity)
        flips = self._signflips(step, now, active)
        self._scalars(step, rec, sparsity, layer)
        self._progress(step, rec, flips)
        return rec

    def _health(self, step: int, rec: dict[str, Any], diag: dict[str, Any] | None,
                warning: str | None) -> None:
        if diag is not None:
            fraction = diag["clamped_fraction"] if diag["entries"] else None  # no counted step
            rec["ham"] = {"clamped_fraction": fraction, "capped": diag["capped"]}
            if self.tb and fraction is not None:
                self.tb.add_scalar("ham/clamped_fraction", diag["clamped_fraction"], step)
                self.tb.add_scalar("ham/capped", diag["capped"], step)
        if warning:
            print(f"warning: {warning}", flush=True)
            self.metrics.write({"event": "warning", "step": step, "message": warning})

    def _masks(self, step: int, layer: dict[str, float], overall: float) -> None:
        events, self.manager.mask_events[:] = list(self.manager.mask_events), []
        for ev in events:
            churn = None if ev["churn"] is None else dict(zip(self.manager.names, ev["churn"].tolist()))
            self.metrics.write(
                {
                    "event": "mask",
                    # The iteration that logs it (what a resume truncates by); the change itself
                    # happened at the manager's optimizer step, which lags it (RigL's
                    # topology-only iterations, skipped steps).
                    "step": step,
                    "optimizer_step": ev["step"],
                    "epoch": self.epoch(ev["step"]),
                    "phase": ev["phase"],
                    "churn": churn,
                    "sparsity": layer,
                    "global_sparsity": overall,
                }
            )
            if self.tb and churn:
                for name, value in churn.items():
                    self.tb.add_scalar(f"churn/{name}", value, ev["step"])

    def _signflips(self, step: int, now: dict | None, active: list[int] | None) -> tuple[int, int] | None:
        tracker = self.manager.tracker
        if now is None:
            return None
        layers = {}
        for i, (name, r) in enumerate(now.items()):
            prev = (self.last_flips or {}).get(name, {"masked": 0, "unmasked": 0})
            layers[name] = {
                "numel": r["numel"],
                "active": r["numel"] if active is None else active[i],
                "masked": r["masked"] - prev["masked"],
                "unmasked": r["unmasked"] - prev["unmasked"],
                "ever_flipped": r["ever_flipped"],
                "differs_from_init": r["differs_from_init"],
            }
        record = {"step": step, "epoch": self.epoch(step), "steps": step - self.last_step, "layers": layers}
        if tracker.per_weight:
            record["hist"] = {name: r["hist"] for name, r in now.items()}
        self.flips.write(record)
        self.last_step, self.last_flips = (
            step,
            {n: {k: r[k] for k in ("masked", "unmasked")} for n, r in now.items()},
        )
        if self.tb:
            for name, r in layers.items():
                self.tb.add_scalar(f"flips/{name}/masked", r["masked"], step)
                self.tb.add_scalar(f"flips/{name}/unmasked", r["unmasked"], step)
            self.tb.add_scalar("flips/all/masked", sum(r["masked"] for r in layers.values()), step)
            self.tb.add_scalar("flips/all/unmasked", sum(r["unmasked"] for r in layers.values()), step)
        return (sum(r["masked"] for r in now.values()), sum(r["unmasked"] for r in now.values()))

    def _scalars(self, step: int, rec: dict[str, Any], sparsity: float, layer: dict[str, float]) -> None:
        if not self.tb:
            return
        for key in ("loss", "acc", "lr", "samples_per_s", "tokens_per_s"):
            if key in rec:
                self.tb.add_scalar(f"train/{key}", rec[key], step)
        self.tb.add_scalar("sparsity/global", sparsity, step)
        for name, value in layer.items():
            self.tb.add_scalar(f"sparsity/{name}", value, step)

    def _progress(self, step: int, rec: dict[str, Any], flips: tuple[int, int] | None) -> None:
        if not self.cfg.logging.progress:
            return
        done = step - self.start_step
        eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total_steps - step)
        flip_text = f" | flips {flips[1]:,} unmasked, {flips[0]:,} masked" if flips else ""
        print(
            f"step {step}/{self.total_steps} (epoch {rec['epoch']:.2f}) | loss {rec['loss']:.4f} "
            f"acc {100 * rec['acc']:.1f}% | lr {rec['lr']:.3g} | sparsity {100 * rec['sparsity']:.2f}%"
            f"{flip_text} | {_rate_text(rec)} | ETA {_fmt_time(eta)}",
            flush=True,
        )

    # -- other events ---------------------------------------------------------------------------
    def event(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.metrics.write(record)

    def log_eval(self, step: int, split: str, loss: float, acc: float) -> None:
        if not self.enabled:
            return
        record = {"event": "eval", "step": step, "epoch": self.epoch(step), "split": split, "loss": loss,
                  "acc": acc}
        if self.seq_len:
            record["perplexity"] = perplexity(loss)
        self.metrics.write(record)
        if self.tb:
            for key in ("loss", "acc", "perplexity"):
                if key in record:
                    self.tb.add_scalar(f"eval/{split}_{key}", record[key], step)
        if self.cfg.logging.progress:
            extra = f" perplexity {record['perplexity']:.3f}" if self.seq_len else ""
            print(f"  eval {split}: loss {loss:.4f} acc {100 * acc:.2f}%{extra}", flush=True)

    def histograms(self, step: int) -> None:
        if not self.cfg.logging.tensorboard:
            return
        for name, p in zip(self.manager.names, self.manager.params):
            whole = sharding.full(p.detach())  # sharded: an all-gather, on every rank
            if self.enabled and self.tb:
                self.tb.add_histogram(f"weights/{name}", whole.float().cpu(), step)

    def _layout(self) -> None:
        chart = {
            name: ["Multiline", [f"flips/{name}/masked", f"flips/{name}/unmasked"]]
            for name in self.manager.names
        }
        chart = {"all layers": ["Multiline", ["flips/all/masked", "flips/all/unmasked"]], **chart}
        self.tb.add_custom_scalars(
            {
                "Sign flips per log interval (masked vs unmasked)": chart,
                "Accuracy": {"train vs eval": ["Multiline", ["train/acc", "eval/test_acc", "eval/val_acc"]]},
            }
        )

    def finish(self, final: dict[str, Any]) -> None:
        """Write the HParams entry and close every sink."""
        if not self.enabled:
            return
        self.metrics.write({"event": "end", "step": final["steps"], "wall_time_s": final["wall_time_s"]})
        if self.tb:
            hp = {
                "method": final["method"],
                "target": final["target"],
                "ham": final["ham"]["enabled"],
                "alpha": final["ham"]["alpha"],
                "beta": final["ham"]["beta"],
                "lr": final["lr"],
                "seed": final["seed"],
                "dataset": final["dataset"],
                "model": final["model"],
            }
            metrics = {
                "hparam/test_acc": final["test_acc"],
                "hparam/sparsity": final["sparsity"],
                "hparam/total_flips": final["flips_masked"] + final["flips_unmasked"],
            }
            metrics = {k: (v if v is not None and math.isfinite(v) else 0.0) for k, v in metrics.items()}
            # Discrete domains for the categorical hparams: without one, TensorBoard's HParams
            # dashboard leaves method, model and seed unticked.
            domains = {k: [v] for k, v in hp.items() if k in ("method", "model", "dataset", "seed", "ham")}
            self.tb.add_hparams(hp, metrics, hparam_domain_discrete=domains, run_name=".")
        self.close()

    def close(self) -> None:
        if self.enabled:
            self.metrics.close()
            self.flips.close()
            if self.tb:
                self.tb.close()

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss": self._loss,
            "correct": self._correct,
            "seen": self._seen,
            "last_step": self.last_step,
            "last_flips": self.last_flips,
            "wall": self.wall_time(),
            "health": self.health.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loss.copy_(state["loss"])
        self._correct.copy_(state["correct"])
        self._seen, self.last_step, self.last_flips = state["seen"], state["last_step"], state["last_flips"]
        self.wall_offset = state["wall"]
        self.health.load_state_dict(state.get("health", {}))
