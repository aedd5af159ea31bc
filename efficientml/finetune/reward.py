"""A Bradley–Terry reward model: a scalar head on a language model's last hidden state, trained on
preference pairs so that P(chosen ≻ rejected) = σ(r_c − r_r)::

    r(x, y) = w · h_last(x, y) + b          h_last: the final-norm hidden state at the sequence's last token
    L = −log σ(r_c − r_r)                    (mean over pairs)

The trunk is the LM's ``model`` (the decoder without ``lm_head``); apply LoRA to it first to train
adapters plus the head, or leave it trainable for full fine-tuning.

    rm = RewardModel(apply(lm, LoRAConfig(rank=8), inplace=True).model)
    hist = train_reward(rm, prefs, RewardConfig(steps=50))
    reward_accuracy(rm, held_out_prefs)       # share of pairs with r_c > r_r
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.config import Config
from efficientml.core.errors import ConfigError
from efficientml.core.progress import track
from efficientml.finetune.preference import PreferenceSet, pair_batches
from efficientml.finetune.sft import SFTConfig, build_optimizer
from efficientml.finetune.sft_data import IGNORE
from efficientml.train.schedule import SCHEDULES


class RewardModel(nn.Module):
    """``lm.model`` (the trunk) + ``score``: Linear(d, 1), zero-initialised (every reward starts at 0)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        trunk = getattr(lm, "model", None)
        if trunk is None or not hasattr(lm, "config"):
            raise ConfigError(f"RewardModel needs an efficientml causal LM (with .model and .config), got "
                              f"{type(lm).__name__}")
        self.model, self.config = trunk, lm.config
        self.score = nn.Linear(lm.config.hidden_size, 1, device=lm.device, dtype=torch.float32)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """ids (B, T), right-padded; ``last`` (B,) the index of each row's last real token → rewards (B,)."""
        h = self.model(ids)  # (B, T, d)
        h_last = h[torch.arange(ids.shape[0], device=ids.device), last]  # (B, d)
        return self.score(h_last.float()).squeeze(-1)


def last_index(labels: torch.Tensor) -> torch.Tensor:
    """(B,) the position of each row's last labelled token (its EOS): the rows are right-padded."""
    pos = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    return torch.where(labels != IGNORE, pos, torch.zeros_like(pos)).amax(1)


def pair_rewards(rm: RewardModel, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of a :meth:`PreferenceSet.batch` (chosen first): (r_chosen (B,), r_rejected (B,))."""
    r = rm(ids, last_index(labels))
    n = ids.shape[0] // 2
    return r[:n], r[n:]


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(r_chosen - r_rejected).mean()


@dataclass(frozen=True)
class RewardConfig(Config):
    kind = "reward"
    lr: float = 1e-3
    steps: int = 50
    batch_size: int = 8
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_frac: float = 0.05
    grad_clip: float | None = 1.0
    seed: int = 0

    def validate(self) -> None:
        for name in ("steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        SFTConfig(lr=self.lr, optimizer=self.optimizer, schedule=self.schedule, warmup_frac=self.warmup_frac)


def train_reward(rm: RewardModel, prefs: PreferenceSet, cfg: RewardConfig = RewardConfig(),
                 progress: bool | None = None) -> dict[str, Any]:
    """Train the head (and whatever of the trunk is trainable) on the pairs; returns the loss curve."""
    torch.manual_seed(cfg.seed)
    rm.score.requires_grad_(True)
    params = [p for p in rm.parameters() if p.requires_grad]
    opt = build_optimizer(rm, SFTConfig(lr=cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, SCHEDULES[cfg.schedule](cfg.steps, cfg.warmup_frac))
    data, curve, t0 = pair_batches(len(prefs), min(cfg.batch_size, len(prefs)), cfg.seed), [], time.perf_counter()
    dev = rm.score.weight.device
    rm.train()
    for step in track(range(cfg.steps), "reward model", total=cfg.steps, enabled=progress):
        ids, labels = (t.to(dev) for t in prefs.batch(next(data)))
        rc, rr = pair_rewards(rm, ids, labels)
        loss = bradley_terry_loss(rc, rr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        curve.append({"step": step + 1, "loss": loss.item(), "accuracy": (rc > rr).float().mean().item()})
    rm.eval()
    return {"curve": curve, "steps": cfg.steps, "config": cfg.to_dict(), "seconds": time.perf_counter() - t0}


@torch.no_grad()
def reward_accuracy(rm: RewardModel, prefs: PreferenceSet, batch_size: int = 16) -> dict[str, float]:
    """Share of pairs the model ranks right (r_c > r_r), and the mean margin."""
    was = rm.training
    rm.eval()
    right, margin, dev = 0, 0.0, rm.score.weight.device
    for s in range(0, len(prefs), batch_size):
        idx = torch.arange(s, min(s + batch_size, len(prefs)))
        rc, rr = pair_rewards(rm, *(t.to(dev) for t in prefs.batch(idx)))
        right += int((rc > rr).sum())
        margin += float((rc - rr).sum())
    rm.train(was)
    return {"accuracy": right / len(prefs), "mean_margin": margin / len(prefs), "pairs": len(prefs)}
