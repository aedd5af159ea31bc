"""The plain training loop shared by everything that trains: fine-tuning after pruning, QAT, KD,
supernets. Hooks instead of subclasses:

- ``after_step(model)`` runs after every optimizer step (re-apply pruning masks, clamp, EMA);
- ``extra_loss(model, logits, y)`` adds a term to the loss (L1 on BN γ, KD, regularizers);
- ``loss_fn(logits, y)`` replaces cross-entropy (distillation trainers).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.device import seed_everything
from efficientml.core.errors import ConfigError
from efficientml.core.progress import track
from efficientml.train.config import TrainConfig
from efficientml.train.schedule import SCHEDULES


@dataclass
class History:
    steps: int = 0
    epochs: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "epochs": self.epochs, "seconds": round(self.seconds, 2)}


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # no weight decay on BN/bias parameters (1-D tensors)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def fit(model: nn.Module, train_loader: Iterable, cfg: TrainConfig | None = None,
        eval_loader: Iterable | None = None,
        after_step: Callable[[nn.Module], None] | None = None,
        extra_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        optimizer: torch.optim.Optimizer | None = None, start_step: int = 0,
        progress: bool | None = None,
        on_epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> History:
    """Train ``model`` in place; returns the per-epoch history (train loss/acc, eval acc)."""
    cfg = cfg or TrainConfig()
    n_batches = len(train_loader)  # type: ignore[arg-type]
    if n_batches == 0:
        raise ConfigError("the training loader yields no batches; expected at least one")
    total = max(1, math.ceil(cfg.epochs * n_batches))
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    seed_everything(cfg.seed)
    device = _device_of(model)
    opt = optimizer or make_optimizer(model, cfg)
    sched = _schedule(opt, cfg, total, start_step)
    use_amp = cfg.amp and device.type == "cuda"
    hist, step, t0 = History(steps=start_step), start_step, time.perf_counter()
    epoch = 0
    while step < total:
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        remaining = min(n_batches, total - step)
        for i, (x, y) in enumerate(track(train_loader, f"epoch {epoch + 1}", total=n_batches,
                                         enabled=progress)):
            if i >= remaining:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss, logits = _train_batch(model, x, y, opt, sched, cfg, use_amp, loss_fn, extra_loss)
            step += 1
            if after_step is not None:
                after_step(model)
            loss_sum += loss.item() * y.shape[0]
            correct += (logits.argmax(1) == y).sum().item()
            seen += y.shape[0]
        rec = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(1, seen),
               "train_accuracy": 100.0 * correct / max(1, seen), "lr": opt.param_groups[0]["lr"]}
        if eval_loader is not None:
            ev = evaluate(model, eval_loader)
            rec["eval_accuracy"], rec["eval_loss"] = ev["accuracy"], ev["loss"]
        rec["seconds"] = time.perf_counter() - t0
        hist.epochs.append(rec)
        if on_epoch_end is not None:
            on_epoch_end(epoch, rec)
        epoch += 1
    hist.steps, hist.seconds = step, time.perf_counter() - t0
    return hist


def _schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, total: int,
              start_step: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule over ``total`` steps, already at ``start_step`` when resuming."""
    lr_at = SCHEDULES[cfg.schedule](total, cfg.warmup_frac)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    if start_step:  # resuming: jump the schedule to where the checkpoint left it
        sched.last_epoch = start_step
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_at(start_step)
    return sched


def _train_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LambdaLR, cfg: TrainConfig, use_amp: bool,
                 loss_fn: Callable | None, extra_loss: Callable | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, loss, backward, optimizer and schedule step on one batch; returns (loss, logits)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp):
        logits = model(x)
        loss = (loss_fn(logits, y) if loss_fn is not None else
                F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing))
        if extra_loss is not None:
            loss = loss + extra_loss(model, logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    sched.step()
    return loss, logits


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, max_batches: int | None = None) -> dict[str, float]:
    """Top-1 accuracy (percent) and mean cross-entropy over the loader."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    loss_sum, correct, seen = 0.0, 0, 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        seen += y.shape[0]
    model.train(was_training)
    if seen == 0:
        raise ConfigError("the evaluation loader yields no examples; expected at least one")
    return {"accuracy": 100.0 * correct / seen, "loss": loss_sum / seen, "examples": seen}
