"""The SFT trainer: next-token loss on the labelled tokens, gradient accumulation, gradient
checkpointing per decoder block, AdamW or 8-bit AdamW, on the shared schedules and optimizer groups of
:mod:`efficientml.train` (its ``fit`` is a per-example classification loop; a causal LM's loss is per
token, so the step loop is here).

    cfg = SFTConfig(lr=2e-4, steps=100, batch_size=4, grad_accum=2, grad_checkpointing=True)
    hist = train_sft(model, batches(ids, labels, cfg.batch_size), cfg)

Accumulation is exact: a step's loss is the sum of its micro-batches' token losses over the step's
labelled-token count, so ``grad_accum=k`` at ``batch_size=b`` gives the gradient of one batch of k·b.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from efficientml.core.config import Config, check_choice, check_range
from efficientml.core.errors import ConfigError
from efficientml.core.progress import track
from efficientml.finetune.optim8bit import AdamW8bit
from efficientml.finetune.sft_data import IGNORE
from efficientml.train import TrainConfig, make_optimizer
from efficientml.train.distributed import DistContext
from efficientml.train.schedule import SCHEDULES


@dataclass(frozen=True)
class SFTConfig(Config):
    kind = "sft"
    lr: float = 2e-4
    steps: int = 100                 # optimizer steps
    batch_size: int = 4              # rows per micro-batch
    grad_accum: int = 1              # micro-batches per optimizer step
    optimizer: str = "adamw"         # "adamw" | "adamw8bit" (blockwise 8-bit moments)
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_frac: float = 0.05
    grad_clip: float | None = 1.0
    grad_checkpointing: bool = False
    seed: int = 0

    def validate(self) -> None:
        check_range("lr", self.lr, 0.0, 10.0, lo_open=True)
        for name in ("steps", "batch_size", "grad_accum"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        check_choice("optimizer", self.optimizer, ("adamw", "adamw8bit"))
        check_choice("schedule", self.schedule, tuple(SCHEDULES))
        check_range("warmup_frac", self.warmup_frac, 0.0, 1.0)


def token_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of next-token CE over labelled positions, their count)."""
    logits = model(ids[:, :-1])  # (B, T-1, V)
    target = labels[:, 1:]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((target != IGNORE).sum())


class _CheckpointedBlock(nn.Module):
    """Runs a decoder block under ``torch.utils.checkpoint``: its activations are recomputed in backward."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.block(*args)
        return checkpoint(self.block, *args, use_reentrant=False)


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Within the block, every ``model.model.layers[i]`` keeps only its input for backward; the
    blocks are put back on exit (module names, hence adapter keys, are unchanged outside)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not enabled or layers is None:
        yield model
        return
    originals = list(layers)
    for i, block in enumerate(originals):
        layers[i] = _CheckpointedBlock(block)
    try:
        yield model
    finally:
        for i, block in enumerate(originals):
            layers[i] = block


def build_optimizer(model: nn.Module, cfg: SFTConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":  # the shared parameter groups (no decay on 1-D tensors)
        return make_optimizer(model, TrainConfig(lr=cfg.lr, optimizer="adamw", weight_decay=cfg.weight_decay))
    return AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_sft(model: nn.Module, data: Iterator[tuple[torch.Tensor, torch.Tensor]], cfg: SFTConfig,
              optimizer: torch.optim.Optimizer | None = None, progress: bool | None = None,
              on_step: Callable[[int, dict[str, float]], None] | None = None,
              dist: DistContext | None = None) -> dict[str, Any]:
    """Train ``model`` in place for ``cfg.steps`` optimizer steps; returns the loss curve and throughput.
    With ``dist`` (:func:`efficientml.train.distributed.init_distributed`) the model runs in DDP: every
    rank draws the same global batches from ``data`` and trains on its shard of each; only rank 0 shows
    progress and calls ``on_step``; the curve is the global one."""
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters; apply a LoRAConfig/QLoRAConfig or unfreeze it")
    opt = optimizer or build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, SCHEDULES[cfg.schedule](cfg.steps, cfg.warmup_frac))
    dev = next(iter(params)).device
    curve, tokens, t0 = [], 0, time.perf_counter()
    main = dist is None or dist.main
    model.train()
    with gradient_checkpointing(model, cfg.grad_checkpointing):
        net = dist.wrap(model) if dist is not None else model
        for step in track(range(cfg.steps), "fine-tuning", total=cfg.steps, enabled=progress if main else False):
            micro = [next(data) for _ in range(cfg.grad_accum)]
            n_lab = sum(int((lab[:, 1:] != IGNORE).sum()) for _, lab in micro)  # the global batch's count
            opt.zero_grad(set_to_none=True)
            total = _accumulate(net, micro, n_lab, dev, dist)
            tokens += sum(ids.numel() for ids, _ in micro)
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            rec = {"step": step + 1, "loss": total / max(1, n_lab), "lr": opt.param_groups[0]["lr"]}
            curve.append(rec)
            if on_step is not None and main:
                on_step(step, rec)
    model.eval()
    seconds = time.perf_counter() - t0
    return {"curve": curve, "steps": cfg.steps, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / max(seconds, 1e-9), "world_size": dist.world_size if dist else 1}


def _accumulate(net: nn.Module, micro: list, n_lab: int, dev: torch.device, dist: DistContext | None) -> float:
    """Backward over the step's micro-batches (this rank's shard of each); returns the global loss sum."""
    total, world = 0.0, dist.world_size if dist is not None else 1
    for i, (ids, lab) in enumerate(micro):
        if dist is not None:
            ids, lab = dist.shard(ids), dist.shard(lab)
        sync = dist.no_sync(net, i < len(micro) - 1) if dist is not None else contextlib.nullcontext()
        with sync:
            loss, _ = token_loss(net, ids.to(dev), lab.to(dev))
            (loss * world / max(1, n_lab)).backward()  # DDP averages over ranks: × world gives the sum
        total += loss.item()
    return dist.all_sum(total) if dist is not None else total
