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

With ``teacher=`` (e.g. a copy of the model taken before pruning) the loss is distilled
(as :func:`sparseham.distill.distillation_loss`): ``(1 - w) * the model's loss + w * T² * KL(teacher ||
student)`` over the logits, averaged over the positions the attention mask keeps, with ``T =
distill_temperature`` and ``w = distill_weight``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from sparseham import HAM, MaskManager
from sparseham.distill import kl_to_teacher

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
        teacher: a model whose logits the student's are distilled towards (frozen, put in eval mode
            and on the model's device here), or None for the plain loss.
        distill_temperature, distill_weight: T and w of the distillation (module docstring).
        args, kwargs: the ``Trainer``'s own positional and keyword arguments.
    """

    def __init__(self, *args, method, ham: dict[str, Any] | None = None, tracker=None, include=None,
                 exclude=None, teacher: torch.nn.Module | None = None, distill_temperature: float = 2.0,
                 distill_weight: float = 0.5, **kwargs) -> None:
        if not distill_temperature > 0 or not 0 <= distill_weight <= 1:
            raise ValueError(f"distill_temperature = {distill_temperature} and distill_weight = "
                             f"{distill_weight}; expected a temperature > 0 and a weight in [0, 1]")
        super().__init__(*args, **kwargs)
        self.method, self.ham_options, self.tracker = method, ham, tracker
        self.include, self.exclude = include, exclude
        self.teacher = teacher
        self.distill_temperature, self.distill_weight = distill_temperature, distill_weight
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            teacher.to(self.args.device)
        self.mask_manager: MaskManager | None = None
        self._pipeline = _Pipeline(self)
        self.add_callback(self._pipeline)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        self._pipeline.resume_from = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        if self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        with torch.no_grad():
            teacher_logits = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        mask = inputs.get("attention_mask")
        kl = kl_to_teacher(outputs.logits, teacher_logits, self.distill_temperature,
                           None if mask is None else mask.bool())
        if self._loss_scaled_for_accumulation(num_items_in_batch):
            # The model's loss is already its share of the accumulated batch's mean, which the Trainer
            # does not divide again; the KL term, a mean over this micro-batch, takes the same share.
            kl = kl / getattr(self, "current_gradient_accumulation_steps", 1)
        mixed = (1 - self.distill_weight) * loss + self.distill_weight * kl
        return (mixed, outputs) if return_outputs else mixed

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Transformers' own rule (``Trainer.training_step``) for a loss it does not divide by the
        gradient accumulation steps."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        mm = self.mask_manager
        if mm is not None and "loss" in logs:  # training logs only; one device read each
            logs["sparsity"] = mm.sparsity()
            if mm.tracker is not None:
                flips = mm.tracker.read().values()
                logs["flips_masked"] = sum(f["masked"] for f in flips)
                logs["flips_unmasked"] = sum(f["unmasked"] for f in flips)
        super().log(logs, *args, **kwargs)
