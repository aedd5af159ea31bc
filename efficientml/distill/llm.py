"""Shrink a decoder-only LLM, then recover it by distillation from the original (Minitron-style).

Depth pruning: each block's influence (ShortGPT's Block Influence, ``1 − cos(h_in, h_out)`` averaged over
calibration tokens: a block that barely turns the residual stream matters least) ranks the blocks;
:func:`drop_layers` removes the chosen ones physically (a smaller ``nn.ModuleList``, the config's layer
count and each attention's cache index renumbered), so the student is a real, smaller model.

Recovery: :func:`distill_llm` trains the student on token batches with
``alpha · T² · KL(teacher ‖ student) + (1 − alpha) · CE`` per token (``alpha = 0``: plain next-token
fine-tuning on the same tokens, the control). The teacher runs in ``torch.no_grad`` on the same batch.
:func:`correct_teacher` first fine-tunes the teacher on the distillation data (Minitron's teacher
correction: a teacher that never saw the data's distribution teaches the student its own shift).

    order = block_influence(model, calib_ids)           # {layer index: influence}, lowest first to drop
    student = drop_layers(copy.deepcopy(model), lowest(order, 6))
    distill_llm(student, model, batches(ids, labels, 4), LLMDistillConfig(steps=200))
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.config import Config, check_range
from efficientml.core.errors import ConfigError, ShapeError
from efficientml.train.distributed import DistContext
from efficientml.train.schedule import SCHEDULES

IGNORE = -100  # label of a position that is not trained (padding, a prompt)


def _blocks(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"{type(model).__name__} has no .model.layers block list; expected an efficientml "
                          "LlamaForCausalLM (efficientml.llm.model)")
    return layers


@torch.no_grad()
def block_influence(model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> dict[int, float]:
    """{block index: mean over tokens of 1 − cos(block input, block output)} on ``ids`` (rows, T)."""
    layers = _blocks(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0

    def hook(i: int):
        def fn(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            cos = F.cosine_similarity(args[0].float(), out.float(), dim=-1)  # (B, T)
            sums[i] += (1.0 - cos).sum().double()
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    was = model.training
    model.eval()
    try:
        for s in range(0, ids.shape[0], batch_size):
            chunk = ids[s:s + batch_size]
            model(chunk)
            count += chunk.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if count == 0:
        raise ShapeError("block_influence needs at least one calibration token; got an empty ids tensor")
    return {i: float(sums[i] / count) for i in range(len(layers))}


def lowest(influence: dict[int, float], n: int) -> list[int]:
    """The ``n`` blocks of least influence (the ones to drop), in index order."""
    if not 0 <= n < len(influence):
        raise ConfigError(f"can drop 0 to {len(influence) - 1} of {len(influence)} blocks, asked for {n}")
    return sorted(sorted(influence, key=influence.__getitem__)[:n])


def drop_layers(model: nn.Module, drop: Sequence[int]) -> nn.Module:
    """Remove blocks ``drop`` from ``model`` in place (a real, smaller model) and return it."""
    layers = _blocks(model)
    bad = [i for i in drop if not 0 <= int(i) < len(layers)]
    if bad or len(set(drop)) == len(layers):
        raise ConfigError(f"blocks to drop must be distinct indices in 0…{len(layers) - 1}, keeping at least "
                          f"one; got {list(drop)}")
    keep = [layer for i, layer in enumerate(layers) if i not in set(int(d) for d in drop)]
    for new_idx, layer in enumerate(keep):
        layer.self_attn.layer_idx = new_idx  # the KV cache is indexed by position in the list
    model.model.layers = nn.ModuleList(keep)
    cfg = dataclasses.replace(model.config, num_hidden_layers=len(keep))
    model.config = model.model.config = cfg
    return model


@dataclass(frozen=True)
class LLMDistillConfig(Config):
    kind = "llm_distill"

    steps: int = 200
    lr: float = 1e-4
    alpha: float = 1.0          # weight of the distillation term; 0 = plain next-token fine-tuning
    temperature: float = 1.0
    warmup_frac: float = 0.05
    schedule: str = "cosine"
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0

    def validate(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps <= 0:
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}")
        check_range("lr", self.lr, 0.0, 1.0, lo_open=True)
        check_range("alpha", self.alpha, 0.0, 1.0)
        check_range("temperature", self.temperature, 0.0, 100.0, lo_open=True)
        check_range("warmup_frac", self.warmup_frac, 0.0, 1.0)
        check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")


def token_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                  alpha: float, temperature: float, count: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Logits (B, T, V) of both models, labels (B, T) (the next token is ``labels[:, t + 1]``; IGNORE
    positions excluded) → (mean over trained positions of α·T²·KL(p_t ‖ p_s) + (1 − α)·CE, parts).
    ``count``: divide the sums by this many positions instead (a data-parallel shard of a global batch)."""
    if student_logits.shape != teacher_logits.shape:
        raise ShapeError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; both models need the same vocabulary")
    s, t = student_logits[:, :-1].float(), teacher_logits[:, :-1].float()
    target = labels[:, 1:]
    keep = target != IGNORE  # (B, T-1)
    n = keep.sum().clamp(min=1) if count is None else max(1, count)
    ce = F.cross_entropy(s.flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum") / n
    parts = {"ce": float(ce.detach())}
    loss = (1.0 - alpha) * ce
    if alpha > 0:
        tau = temperature
        log_ps, log_pt = F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # (B, T-1)
        kd = (kl * keep).sum() / n * tau * tau
        loss = loss + alpha * kd
        parts["kd"] = float(kd.detach())
    return loss, parts


def distill_llm(student: nn.Module, teacher: nn.Module | None, data: Iterator[tuple[torch.Tensor, torch.Tensor]],
                cfg: LLMDistillConfig, progress: Any = None, dist: DistContext | None = None) -> dict[str, Any]:
    """Train ``student`` in place for ``cfg.steps`` steps on batches (ids, labels) from ``data``; the loss
    is :func:`token_kd_loss` against ``teacher`` (frozen; may be None only when ``alpha == 0``).
    With ``dist`` (:func:`efficientml.train.distributed.init_distributed`, under ``torchrun``) every rank
    draws the same global batches, trains the DDP-wrapped student on its shard and its own teacher copy
    runs on the same shard; the curve is the global one. Returns the loss curve, tokens and seconds."""
    if teacher is None and cfg.alpha > 0:
        raise ConfigError("distill_llm with alpha > 0 needs a teacher; pass the original model")
    torch.manual_seed(cfg.seed)
    if teacher is not None:
        teacher.eval()
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the student has no trainable parameters; unfreeze it (student.requires_grad_(True)) "
                          "or apply an adapter first")
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, SCHEDULES[cfg.schedule](cfg.steps, cfg.warmup_frac))
    curve, tokens, t0 = [], 0, time.perf_counter()
    student.train()
    net = dist.wrap(student) if dist is not None else student
    for step in range(cfg.steps):
        ids, labels = next(data)
        rec = _step(net, teacher, ids, labels, cfg, dist)
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        tokens += ids.numel()
        curve.append({"step": step + 1, **rec})
        if progress is not None and (dist is None or dist.main):
            progress(step, curve[-1])
    student.eval()
    seconds = time.perf_counter() - t0
    return {"curve": curve, "steps": cfg.steps, "tokens": tokens, "seconds": seconds,
            "final_loss": curve[-1]["loss"] if curve else math.nan, "world_size": dist.world_size if dist else 1}


def _step(net: nn.Module, teacher: nn.Module | None, ids: torch.Tensor, labels: torch.Tensor,
          cfg: LLMDistillConfig, dist: DistContext | None) -> dict[str, float]:
    """Forward and backward of one global batch (this rank's shard of it); the global loss and parts."""
    count = int((labels[:, 1:] != IGNORE).sum())  # over the whole global batch: every rank sees it
    if dist is not None:
        ids, labels = dist.shard(ids), dist.shard(labels)
    with torch.no_grad():
        t_logits = teacher(ids) if cfg.alpha > 0 else None
    s_logits = net(ids)
    loss, parts = token_kd_loss(s_logits, t_logits if t_logits is not None else s_logits.detach(), labels,
                                cfg.alpha, cfg.temperature, count=count)
    (loss * (dist.world_size if dist is not None else 1)).backward()  # DDP averages: × world sums the shards
    rec = {"loss": float(loss.detach()), **parts}
    return {k: dist.all_sum(v) for k, v in rec.items()} if dist is not None else rec


def correct_teacher(teacher: nn.Module, data: Iterator[tuple[torch.Tensor, torch.Tensor]], cfg: LLMDistillConfig,
                    progress: Any = None, dist: DistContext | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Minitron's teacher correction: a copy of ``teacher`` fine-tuned by next-token cross-entropy on the
    distillation data (``cfg`` with its ``alpha`` ignored), so the teacher's distribution matches the data
    the student is recovered on before it teaches. Returns (the corrected copy, frozen and in eval mode,
    its :func:`distill_llm` record); ``teacher`` itself is untouched."""
    fixed = copy.deepcopy(teacher).requires_grad_(True)
    record = distill_llm(fixed, None, data, dataclasses.replace(cfg, alpha=0.0), progress=progress, dist=dist)
    return fixed.requires_grad_(False).eval(), record
