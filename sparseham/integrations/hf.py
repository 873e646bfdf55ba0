"""The sparse pipeline in a Hugging Face ``transformers`` Trainer (``pip install .[hf]``)::

    from sparseham import SignFlipTracker, methods
    from sparseham.integrations.hf import SparseTrainer

    trainer = SparseTrainer(model=model, args=args, train_dataset=data,
                            method=methods.get("rigl")(target=0.9), ham={"alpha": 20.0, "beta": 1e-3},
                            tracker=SignFlipTracker())
    trainer.train()                                # or trainer.train(resume_from_checkpoint=True)

At ``on_train_begin`` the Trainer's optimizer (created, prepared and, on resume, restored by the
Trainer as usual) is wrapped in :class:`sparseham.HAM` and a :class:`sparseham.MaskManager`, and
the Trainer steps the manager's pipeline from then on. Every Trainer checkpoint also holds
``sparseham.pt`` (the manager's masks, step count, method and tracker state), which
``resume_from_checkpoint`` restores. Sparsity and sign flips join the Trainer's logs (``sparsity``,
``flips_masked``, ``flips_unmasked``), read from the device only at its logging steps.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from sparseham import HAM, MaskManager

__all__ = ["SparseTrainer", "STATE_FILE"]

STATE_FILE = "sparseham.pt"


class _Pipeline(TrainerCallback):
    def __init__(self, trainer: SparseTrainer) -> None:
        self.trainer = trainer
        self.resume_from: str | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        t = self.trainer
        prepared = optimizer  # accelerate's wrapper; the Trainer steps what it holds
        base = prepared.optimizer
        opt = HAM(base, **t.ham_options) if t.ham_options is not None else base
        mm = MaskManager(model, opt, t.method, t.tracker, t.include, t.exclude, total_steps=state.max_steps)
        if self.resume_from is not None:
            saved = torch.load(os.path.join(self.resume_from, STATE_FILE), map_location="cpu",
                               weights_only=True)
            mm.load_state_dict(saved)
        prepared.optimizer = mm.as_optimizer()
        t.mask_manager = mm

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.trainer.mask_manager is not None:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            torch.save(self.trainer.mask_manager.state_dict(), os.path.join(folder, STATE_FILE))


class SparseTrainer(Trainer):
    """A ``transformers.Trainer`` whose optimizer steps run the sparse pipeline.

    Args:
        method: a :class:`sparseham.Method` instance, e.g. ``methods.get("rigl")(target=0.9)``.
        ham: keyword arguments of :class:`sparseham.HAM` (``{"alpha": 20.0}``), or ``None`` for the
            Trainer's optimizer alone.
        tracker: an optional :class:`sparseham.SignFlipTracker`.
        include, exclude: which parameters the manager manages (:func:`sparseham.prunable_parameters`).
        args, kwargs: the ``Trainer``'s own positional and keyword arguments.
    """

    def __init__(self, *args, method, ham: dict[str, Any] | None = None, tracker=None, include=None,
                 exclude=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.method, self.ham_options, self.tracker = method, ham, tracker
        self.include, self.exclude = include, exclude
        self.mask_manager: MaskManager | None = None
        self._pipeline = _Pipeline(self)
        self.add_callback(self._pipeline)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        self._pipeline.resume_from = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        mm = self.mask_manager
        if mm is not None and "loss" in logs:  # training logs only; one device read each
            logs["sparsity"] = mm.sparsity()
            if mm.tracker is not None:
                flips = mm.tracker.read().values()
                logs["flips_masked"] = sum(f["masked"] for f in flips)
                logs["flips_unmasked"] = sum(f["unmasked"] for f in flips)
        super().log(logs, *args, **kwargs)
