"""The training loop behind ``sparseham train``: build from a config, train, evaluate, checkpoint, resume.

Reading top to bottom: :func:`run` prepares the run directory, :class:`Trainer` builds every
object from the config, resumes from the newest good checkpoint, and loops. One iteration is
forward, backward, ``MaskManager.step()`` (the whole sparse pipeline), the LR schedule, and the
logger's device-side accumulation; everything that reads device values happens at log,
evaluation and checkpoint intervals.
"""

from __future__ import annotations

import gc
import json
import random
import shutil
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from sparseham import sharding
from sparseham.config import Config, ConfigError, config_to_dict, dump_config
from sparseham.distill import distillation_loss
from sparseham.masks import MaskManager
from sparseham.params import managed_summary
from sparseham.train import checkpoint as ckpt
from sparseham.train.build import (
    build_data_and_model,
    build_method,
    build_optimizer,
    build_scheduler,
    build_teacher,
    build_tracker,
    resolve_device,
)
from sparseham.train.distributed import (
    broadcast_masks_,
    check_ranks_agree,
    init_distributed,
    process_env,
    shard_model,
    wrap_model,
)
from sparseham.train.evaluation import evaluate
from sparseham.train.logger import RunLogger
from sparseham.train.run_dir import (
    RunDirError,
    RunLock,
    check_final_sparsity,
    check_run_path,
    config_difference,
    final_summary,
    prepare_run_dir,
    strict_json,
    write_atomic,
)

__all__ = ["run", "Trainer", "TrainingStopped"]


class SetupError(ValueError):
    """The run could not be set up from its config and data (bad input: one line, exit status 2).
    A ``ValueError`` or ``TypeError`` while building the data, model, optimizer, method or manager
    is raised as this; the same errors during training are bugs and keep their traceback."""


class TrainingStopped(Exception):
    """Training stopped early on purpose; ``code`` is the exit status, ``message`` says why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Trainer:
    """Owns the objects of one run; see the module docstring."""

    sharded = False  # FSDP (train.distributed: fsdp under torchrun); set in __init__

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.device = resolve_device(cfg.train.device)
        self.dist = init_distributed(self.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        torch.manual_seed(cfg.experiment.seed)
        random.seed(cfg.experiment.seed)
        self.data, self.model = build_data_and_model(cfg, self.dist, self.device)
        # The teacher is the model as loaded, before the manager prunes it (rebuilt alike on resume).
        self.teacher = build_teacher(self.model) if cfg.distill.enabled else None
        self.accum = cfg.train.grad_accum
        for split in ("train", "test"):  # fail before training, not at the first evaluation after it
            if getattr(self.data, split).num_samples == 0:
                raise ValueError(f"the {split} split of {cfg.data.dataset} is empty; check data.root and "
                                 "the data set's files (and data.synthetic sizes)")
        self.steps_per_epoch = len(self.data.train) // self.accum
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"train.grad_accum = {self.accum} exceeds the {len(self.data.train)} batches of an epoch"
            )
        t = cfg.train
        self.total = t.max_steps if t.max_steps else max(1, round(t.epochs * self.steps_per_epoch))
        self.sharded = self.dist.enabled and t.distributed == "fsdp"
        if self.sharded:
            shard_model(self.model)  # before the optimizer: fully_shard replaces the parameters
        self.opt = build_optimizer(cfg, self.model)
        s = cfg.sparsity
        # A model may name its own default (a language model keeps embeddings and head dense).
        include = s.include if s.include is not None else getattr(self.model, "default_managed", None)
        self.mm = MaskManager(self.model, self.opt, build_method(cfg), build_tracker(cfg), include,
                              s.exclude, total_steps=self.total, steps_per_epoch=self.steps_per_epoch,
                              data=self._scoring_batches(), verbose=False)
        if self.dist.is_main and cfg.logging.progress:  # stdout: stderr is for the one-line errors
            print(managed_summary(self.model, include, s.exclude), flush=True)
        # After the manager: a method may add parameter groups (STR's thresholds) the schedule must cover.
        self.sched = build_scheduler(cfg, self.opt, self.total, self.steps_per_epoch)
        broadcast_masks_(self.mm, self.dist)
        self.net = wrap_model(self.model, self.dist, self.device, sharded=self.sharded)
        if t.compile:
            self.net = torch.compile(self.net)
        self.amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.amp)
        if t.amp == "fp16" and self.device.type != "cuda":
            raise ValueError("train.amp = 'fp16' needs CUDA (GradScaler); use bf16 on the CPU")
        self.scaler = torch.amp.GradScaler("cuda") if t.amp == "fp16" else None
        self.step, self.skipped, self.stop_signal = 0, 0, None
        # BatchNorm statistics change in the forward pass, before the loss is known to be finite;
        # a rejected step puts them back from this copy (device copies, no host sync).
        self.buffers = list(self.model.buffers())
        self.buffers_before = [b.clone() for b in self.buffers]

    def _scoring_batches(self):
        """Batches for data-driven mask scoring (SNIP, GraSP), produced lazily on first use."""
        for x, y in self.data.train.epoch(0):
            yield x.to(self.device), y.to(self.device)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"config": config_to_dict(self.cfg), "step": self.step, "skipped": self.skipped,
                "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "manager": self.mm.state_dict(),
                "logger": self.logger.state_dict(), "rng": ckpt.rng_state(),
                "scaler": self.scaler.state_dict() if self.scaler else None}

    def save(self) -> None:
        # Sharded (FSDP): every rank takes part in gathering full state dicts; rank 0 writes them.
        state = ckpt.full_tree(self.state_dict()) if self.sharded else None
        if self.dist.is_main:
            ckpt.save_checkpoint(state or self.state_dict(), self.run_dir, keep=self.cfg.checkpoint.keep)
        self.dist.barrier()

    def resume(self) -> int:
        """Restore the newest good checkpoint (falling back past damaged ones); returns its step."""
        where = self.cfg.checkpoint.resume
        if where == "never" or (where == "auto" and not ckpt.candidates(self.run_dir)):
            return 0
        if where == "auto":
            path, state, problems = ckpt.latest_good_checkpoint(self.run_dir, map_location=self.device)
            for problem in problems:
                print(f"warning: skipped a damaged checkpoint, falling back: {problem}", flush=True)
        else:
            path, state = Path(where), ckpt.load_checkpoint(where, map_location=self.device)
        self._check_resumable(path, state)
        self.mm.load_state_dict(state["manager"])  # first: a method may reshape the model (STR)
        model, optimizer = state["model"], state["optimizer"]
        if self.sharded:  # full state dicts, every rank keeps its shards
            model = ckpt.shard_model_state(model, self.model)
            optimizer = ckpt.shard_optimizer_state(optimizer, self.opt)
        self.model.load_state_dict(model)
        self.opt.load_state_dict(optimizer)
        self.sched.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.skipped = state["step"], state["skipped"]
        ckpt.set_rng_state(state["rng"])
        self._logger_state = state["logger"]
        print(f"resumed from {path} at step {self.step}", flush=True)
        return self.step

    def _check_resumable(self, path: Path, state: dict) -> None:
        """Refuse a checkpoint of another run, or one whose step does not fit this run."""
        diff = config_difference(state.get("config"), config_to_dict(self.cfg))
        if diff:
            raise RunDirError(
                f"{path} was saved by a run with another config ({diff}); only the same run resumes "
                "(keys allowed to differ: train.epochs/max_steps/device/eval_every/on_nonfinite, "
                "data.root/num_workers, logging, checkpoint): fix the config, or choose another --out")
        step = state.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= self.total:
            raise RunDirError(f"{path}: step {step!r} is outside this run's 0..{self.total} steps; "
                              "the checkpoint is not this run's")

    # -- the loop -------------------------------------------------------------------------------
    def train(self) -> dict:
        self._logger_state = None
        start = self.resume()
        if self.dist.is_main:  # after resume() accepted the checkpoint: a refused run relabels nothing
            write_atomic(self.run_dir / "config.yaml", dump_config(self.cfg))
        self.logger = RunLogger(self.run_dir, self.mm, self.cfg, total_steps=self.total, start_step=start,
                                steps_per_epoch=self.steps_per_epoch, enabled=self.dist.is_main)
        if self._logger_state:
            self.logger.load_state_dict(self._logger_state)
        source = self.data.info.source
        self.logger.event({"event": "start", "step": start, "total_steps": self.total, "resumed": bool(start),
                           "steps_per_epoch": self.steps_per_epoch, "world_size": self.dist.world_size,
                           "data_source": source})
        if source and self.dist.is_main and self.cfg.logging.progress:
            print(f"data: {self.cfg.data.dataset} from {source}", flush=True)
        previous = self._install_signals()
        try:
            while self.step < self.total:
                epoch, index = divmod(self.step, self.steps_per_epoch)
                batches = self.data.train.epoch(epoch, start=index * self.accum)
                for _ in range(index, self.steps_per_epoch):
                    self.train_step([next(batches) for _ in range(self.accum)])
                    self.after_step()
                    if self.step >= self.total:
                        break
            return self.finish()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _backward(self, micro: list) -> list:
        """Forward and backward over the micro-batches; returns (loss, logits, targets) of each."""
        records = []
        for x, y in micro:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                logits = self.net(x)
                loss = F.cross_entropy(logits.float(), y)
                objective = loss if self.teacher is None else self._distilled(loss, logits, x)
            scaled = objective / self.accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            records.append((loss.detach(), logits.detach(), y))
        return records

    def _distilled(self, loss, logits, x):
        """The task loss mixed with the KL divergence to the teacher (``distill``); the logged loss
        stays the task loss, so perplexities compare with runs without distillation."""
        d = self.cfg.distill
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        return distillation_loss(loss, logits, teacher_logits, temperature=d.temperature, weight=d.weight)

    def train_step(self, micro: list) -> None:
        if self.buffers:
            torch._foreach_copy_(self.buffers_before, self.buffers)
        records = self._backward(micro)
        if self._nonfinite(torch.stack([r[0] for r in records])):
            return
        for record in records:  # a rejected step stays out of the logged loss and accuracy
            self.logger.record_batch(*record)
        if self.cfg.optim.grad_clip:
            # Clip true gradients, before the pipeline (RigL's grow scores see clipped ones too).
            if self.scaler:
                self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        if self.cfg.optim.sam.rho is not None:  # SAM's second pass: the same batches at the perturbed point
            def closure():
                self.opt.zero_grad(set_to_none=True)
                return torch.stack([r[0] for r in self._backward(micro)]).mean()

            self.mm.step(closure, closure_first=False)
        else:
            self.mm.step(scaler=self.scaler)
        if self.scaler:
            self.scaler.update()
        if not self.mm.topology_only:  # the schedule follows optimizer steps, as in RigL's reference
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def _nonfinite(self, losses) -> bool:
        """One host read per step: every micro-batch loss and every gradient must be finite.

        A rejected step leaves weights, masks and optimizer state as they were: its gradients are
        dropped and the BatchNorm statistics restored. Skipped, it still uses up its batch and its
        learning-rate step; the method's step counter does not move.
        """
        if self.cfg.train.on_nonfinite == "ignore":
            return False
        grads = [sharding.local(p.grad) for p in self.model.parameters() if p.grad is not None]
        bad = ~torch.isfinite(losses).all()
        if grads and self.scaler is None:
            # The norm also overflows for finite gradients above ~1e19; such a step is rejected too.
            bad |= ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
        bad = self.dist.any_true(bool(bad), self.device) if self.sharded else bool(bad)  # shards differ
        if not bad:
            return False
        self.opt.zero_grad(set_to_none=True)
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.buffers_before)
        where = f"step {self.step + 1} (epoch {self.step / self.steps_per_epoch:.2f})"
        if self.cfg.train.on_nonfinite == "skip":
            self.skipped += 1
            self.logger.event({"event": "skip", "step": self.step + 1, "skipped": self.skipped})
            self.sched.step()
            return True
        self.save()
        raise TrainingStopped(
            1,
            f"non-finite loss or gradient at {where}: the last good state is in "
            f"{self.run_dir / ckpt.LATEST}; re-run with --set train.on_nonfinite=skip to skip such "
            "steps, or lower optim.lr in a new run",
        )

    def after_step(self) -> None:
        self.step += 1
        step, cfg = self.step, self.cfg
        if step % cfg.logging.log_every == 0 or step == self.total:
            self.logger.log(step, self.opt.param_groups[0]["lr"])
        if cfg.logging.histograms_every and step % cfg.logging.histograms_every == 0:
            self.logger.histograms(step)
        if step % self.steps_per_epoch == 0:
            self.logger.event({"event": "sparsity", "step": step, "epoch": step / self.steps_per_epoch,
                               "target": cfg.sparsity.target or 0.0, "achieved": self.mm.sparsity()})
        every = cfg.train.eval_every or self.steps_per_epoch
        if step % every == 0 and step < self.total:
            self.evaluate(step)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < self.total:
            self.save()
        self._check_signal()

    def evaluate(self, step: int) -> dict[str, tuple[float, float]]:
        out = evaluate(self.model, {"val": self.data.val, "test": self.data.test}, self.device, self.amp)
        for split, (loss, acc) in out.items():
            self.logger.log_eval(step, split, loss, acc)
        return out

    def finish(self) -> dict:
        self.mm.method.finalize(self.mm)
        check_final_sparsity(self.mm)
        results = self.evaluate(self.step)
        final = final_summary(self, results)
        final["world_size"] = self.dist.world_size
        # Replicas (DDP) must agree bit for bit; shards (FSDP) differ by design.
        final["rank_digests"] = None if self.sharded else check_ranks_agree(self.dist, self.mm, self.opt)
        self.save()
        if self.dist.is_main:
            text = json.dumps(strict_json(final), indent=2, allow_nan=False)
            write_atomic(self.run_dir / "final.json", text + "\n")
        self.logger.finish(final)
        return final

    def shutdown(self) -> None:
        """Leave the process group. The model and optimizer go first: gloo's worker thread
        otherwise frees its last work items during interpreter exit, which aborted about 1 in 7
        two-process FSDP runs here ("terminate called without an active exception")."""
        d = self.dist
        if not d.enabled:
            return
        self.__dict__.clear()  # every tensor this trainer holds, the logger's references too
        gc.collect()
        d.barrier()
        torch.distributed.destroy_process_group()

    # -- signals --------------------------------------------------------------------------------
    def _install_signals(self) -> dict:
        """Turn SIGTERM and SIGINT into a checkpoint and a clean stop; returns the old handlers."""

        def handler(signum, frame):
            self.stop_signal = signum

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _check_signal(self) -> None:
        # Under DDP every rank must stop at the same step: agree at log intervals only.
        if self.dist.enabled and self.step % self.cfg.logging.log_every:
            return
        if self.dist.any_true(self.stop_signal is not None, self.device):
            self.save()
            name = signal.Signals(self.stop_signal or signal.SIGTERM).name
            raise TrainingStopped(
                128 + (self.stop_signal or signal.SIGTERM),
                f"{name}: stopped at step {self.step}; checkpoint written; re-run the same command to resume",
            )


def run(cfg: Config, run_dir: Path, *, force: bool = False) -> int:
    """Train ``cfg`` into ``run_dir``; returns the process exit status.

    Rank 0 holds the run directory's lock throughout (:class:`~sparseham.train.run_dir.RunLock`).
    A directory this call created is removed again when set-up fails before training starts, so
    a bad dataset or model leaves nothing behind.
    """
    try:
        env = process_env()  # bad torchrun variables fail here, before the run directory is touched
    except ValueError as err:
        raise SetupError(str(err)) from err
    if cfg.train.distributed == "fsdp" and not env.enabled:
        raise SetupError("train.distributed = 'fsdp' shards the model over several processes, but this is "
                         "one process: start it with torchrun --nproc_per_node=N, or use ddp")
    main = env.is_main
    check_run_path(run_dir)
    created = not run_dir.exists()
    lock = RunLock(run_dir) if main else None
    try:
        if not prepare_run_dir(run_dir, cfg, force=force):
            return 0
        if lock is not None and not lock.path.exists():  # --force moved the old run, lock and all, aside
            lock.release()
            lock = RunLock(run_dir)
        try:
            trainer = Trainer(cfg, run_dir)
        except BaseException as err:
            if created and main and {p.name for p in run_dir.iterdir()} <= {RunLock.NAME}:
                shutil.rmtree(run_dir, ignore_errors=True)
            if isinstance(err, (ValueError, TypeError)) and not isinstance(err, ConfigError):
                raise SetupError(str(err)) from err
            raise
        code = _train(trainer, cfg, run_dir)
        trainer.shutdown()
        return code
    finally:
        if lock is not None:
            lock.release()


def _train(trainer: Trainer, cfg: Config, run_dir: Path) -> int:
    try:
        trainer.train()
        if trainer.dist.is_main:  # the last line says where to look
            board = f"; TensorBoard: tensorboard --logdir {run_dir}" if cfg.logging.tensorboard else ""
            print(f"done: {run_dir} (final.json); report: sparseham report {run_dir}{board}", flush=True)
    except TrainingStopped as stop:
        trainer.logger.close()
        if stop.code > 128:  # a signal: the stop the user asked for
            print(stop, flush=True)
        else:
            print(f"error: {stop}", file=sys.stderr, flush=True)
        return stop.code
    except Exception as err:  # a bug: record it in the run's log, keep the traceback
        logger = getattr(trainer, "logger", None)
        if logger is not None:
            logger.event({"event": "crash", "step": trainer.step, "error": f"{type(err).__name__}: {err}"})
            logger.close()
        raise
    return 0
