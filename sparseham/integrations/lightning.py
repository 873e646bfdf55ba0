"""The sparse pipeline in Lightning, as a ``Callback`` (``pip install .[lightning]``)::

    from sparseham import SignFlipTracker, methods
    from sparseham.integrations.lightning import SparseCallback

    trainer = lightning.Trainer(callbacks=[SparseCallback(methods.get("rigl")(target=0.9),
                                                          ham={"alpha": 20.0}, tracker=SignFlipTracker())])
    trainer.fit(module)                                  # or trainer.fit(module, ckpt_path=...)

At ``on_fit_start`` the module's one optimizer (from ``configure_optimizers``; its state already
restored on resume) is wrapped in :class:`sparseham.HAM` and a :class:`sparseham.MaskManager`, and
Lightning steps the manager's pipeline from then on (``optimizer.step(closure)`` runs the closure,
then the pipeline). The manager's state is the callback's state, so it is in every Lightning
checkpoint and restored with it. ``sparsity``, ``flips_masked`` and ``flips_unmasked`` are logged
every ``log_every_n_steps``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback

from sparseham import HAM, MaskManager

__all__ = ["SparseCallback"]


class SparseCallback(Callback):
    """Runs the sparse pipeline for a LightningModule with one optimizer.

    Args:
        method: a :class:`sparseham.Method` instance, e.g. ``methods.get("rigl")(target=0.9)``.
        ham: keyword arguments of :class:`sparseham.HAM`, or ``None`` for the module's optimizer alone.
        tracker: an optional :class:`sparseham.SignFlipTracker`.
        include, exclude: which parameters the manager manages (:func:`sparseham.prunable_parameters`).
    """

    def __init__(self, method, *, ham: dict[str, Any] | None = None, tracker=None, include=None,
                 exclude=None) -> None:
        self.method, self.ham, self.tracker = method, ham, tracker
        self.include, self.exclude = include, exclude
        self.mask_manager: MaskManager | None = None
        self._saved: dict[str, Any] | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"SparseCallback drives one optimizer; configure_optimizers returned "
                             f"{len(trainer.optimizers)}")
        base = trainer.optimizers[0]
        opt = HAM(base, **self.ham) if self.ham is not None else base
        mm = MaskManager(pl_module, opt, self.method, self.tracker, self.include, self.exclude,
                         total_steps=int(trainer.estimated_stepping_batches))
        if self._saved:
            mm.load_state_dict(self._saved)
        trainer.optimizers = [mm.as_optimizer()]
        self.mask_manager = mm

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        mm = self.mask_manager
        if mm is None or trainer.global_step % max(trainer.log_every_n_steps, 1):
            return  # the device is read at logging steps only
        logs = {"sparsity": mm.sparsity()}
        if mm.tracker is not None:
            flips = mm.tracker.read().values()
            logs["flips_masked"] = float(sum(f["masked"] for f in flips))
            logs["flips_unmasked"] = float(sum(f["unmasked"] for f in flips))
        pl_module.log_dict(logs)

    def state_dict(self) -> dict[str, Any]:
        return self.mask_manager.state_dict() if self.mask_manager is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = state_dict  # applied when the manager is built, at on_fit_start
