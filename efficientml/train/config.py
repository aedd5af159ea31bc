"""Training configuration shared by plain training, fine-tuning after pruning, QAT, KD and supernets."""

from __future__ import annotations

from dataclasses import dataclass

from efficientml.core.config import Config, check_choice, check_range
from efficientml.core.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig(Config):
    kind = "train"

    epochs: float = 10.0             # may be fractional: 0.25 = a quarter of the loader
    lr: float = 0.1                  # peak learning rate
    optimizer: str = "sgd"           # "sgd" (momentum, nesterov) or "adamw"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "triangular"     # linear up to the peak at warmup_frac, then down | "cosine" | "constant"
    warmup_frac: float = 0.3
    label_smoothing: float = 0.0
    grad_clip: float | None = None   # max global grad norm
    amp: bool = True                 # bf16 autocast on CUDA only; ignored on CPU
    seed: int = 0
    max_steps: int | None = None     # stop early after this many optimizer steps
    log_every: int = 50

    def validate(self) -> None:
        check_range("epochs", self.epochs, 0.0, 1e6, lo_open=True)
        check_range("lr", self.lr, 0.0, 100.0, lo_open=True)
        check_choice("optimizer", self.optimizer, {"sgd", "adamw"})
        check_choice("schedule", self.schedule, {"triangular", "cosine", "constant"})
        check_range("warmup_frac", self.warmup_frac, 0.0, 1.0)
        check_range("label_smoothing", self.label_smoothing, 0.0, 1.0, hi_open=True)
        check_range("momentum", self.momentum, 0.0, 1.0, hi_open=True)
        check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"max_steps must be a positive integer or None, got {self.max_steps!r}")

    def finetune(self, factor: float = 0.01, epochs: float | None = None) -> "TrainConfig":
        """The same recipe for fine-tuning after compression: learning rate lowered ``1/factor``×."""
        d = self.to_dict()
        d["lr"] = self.lr * factor
        if epochs is not None:
            d["epochs"] = epochs
        return TrainConfig.from_dict(d)
