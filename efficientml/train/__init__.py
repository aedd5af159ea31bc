"""Training and evaluation shared by every technique that trains (fine-tuning, QAT, KD, NAS)."""

from efficientml.train.checkpoint import (load_checkpoint, load_optimizer_state, read_checkpoint_meta,
                                          save_checkpoint)
from efficientml.train.config import TrainConfig
from efficientml.train.loop import History, evaluate, fit, make_optimizer
from efficientml.train.schedule import SCHEDULES

__all__ = ["History", "SCHEDULES", "TrainConfig", "evaluate", "fit", "load_checkpoint",
           "load_optimizer_state", "make_optimizer", "read_checkpoint_meta", "save_checkpoint"]
