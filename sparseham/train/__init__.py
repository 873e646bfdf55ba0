"""The training application behind ``sparseham train``: build the objects from a config
(``build``), the loop (``trainer``), checkpoints, the run directory, logging, evaluation and
multi-process training (``distributed``)."""

from sparseham.train.trainer import SetupError, Trainer, TrainingStopped, run

__all__ = ["SetupError", "Trainer", "TrainingStopped", "run"]
