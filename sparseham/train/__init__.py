"""The training application behind ``sparseham train``: build the objects from a config
(``build``), the loop (``trainer``), checkpoints, the run directory, logging, evaluation and
multi-process training (``distributed``)."""

from sparseham.train.trainer import Trainer, TrainingStopped, run

__all__ = ["Trainer", "TrainingStopped", "run"]
