"""Direct Preference Optimization (Rafailov et al. 2023) and its IPO variant (Azar et al. 2023).

With π the policy, π_ref the reference, y_w the chosen and y_l the rejected response, and sequence
log-probabilities over the response tokens only::

    h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))
    sigmoid (DPO):  L = −(1 − ε) log σ(β h) − ε log σ(−β h)          ε: label smoothing (cDPO)
    ipo:            L = (h − 1/(2β))²

The reference is the same model with its LoRA adapters switched off (no second copy of the weights),
a separate frozen ``ref_model``, or :class:`~efficientml.finetune.reference.ReferenceLogprobs`
computed once and reused (``reference="precomputed"`` computes them before the first step, so the
reference never runs again during training).

    prefs = PreferenceSet.encode(tok, preference_pairs(tok, rule=LengthRule(max_tokens=8)))
    hist = train_dpo(model, prefs, DPOConfig(beta=0.1, steps=50))
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.config import Config, check_choice, check_range
from efficientml.core.errors import ConfigError
from efficientml.core.progress import track
from efficientml.finetune.inject import adapters
from efficientml.finetune.preference import PreferenceSet, pair_batches
from efficientml.finetune.reference import ReferenceLogprobs, adapters_disabled, sequence_logprobs
from efficientml.finetune.sft import SFTConfig, build_optimizer
from efficientml.train.distributed import DistContext
from efficientml.train.schedule import SCHEDULES

LOSSES = ("sigmoid", "ipo")
REFERENCES = ("adapter", "precomputed")


@dataclass(frozen=True)
class DPOConfig(Config):
    kind = "dpo"
    beta: float = 0.1
    loss: str = "sigmoid"            # "sigmoid" (DPO) | "ipo"
    label_smoothing: float = 0.0     # ε of conservative DPO (sigmoid loss only)
    reference: str = "adapter"       # "adapter": adapters off each step | "precomputed": once, then reused
    lr: float = 5e-4
    steps: int = 50
    batch_size: int = 8              # pairs per step
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_frac: float = 0.05
    grad_clip: float | None = 1.0
    seed: int = 0

    def validate(self) -> None:
        check_range("beta", self.beta, 0.0, 1e3, lo_open=True)
        check_choice("loss", self.loss, LOSSES)
        check_range("label_smoothing", self.label_smoothing, 0.0, 0.5)
        if self.loss == "ipo" and self.label_smoothing:
            raise ConfigError("label_smoothing applies to the sigmoid (DPO) loss only; IPO has none")
        check_choice("reference", self.reference, REFERENCES)
        for name in ("steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        SFTConfig(lr=self.lr, optimizer=self.optimizer, schedule=self.schedule, warmup_frac=self.warmup_frac)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean loss over the pairs (B,) and its statistics: implicit rewards β·(log π − log π_ref) of
    the chosen and rejected responses, their margin, and the share of pairs ranked right."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)  # (B,)
    if loss == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ConfigError(f"DPO loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    rc = beta * (policy_chosen - ref_chosen).detach()
    rr = beta * (policy_rejected - ref_rejected).detach()
    stats = {"reward_chosen": rc.mean().item(), "reward_rejected": rr.mean().item(),
             "reward_margin": (rc - rr).mean().item(), "reward_accuracy": (rc > rr).float().mean().item()}
    return losses.mean(), stats


def _reference_fn(model: nn.Module, prefs: PreferenceSet, cfg: DPOConfig, reference: ReferenceLogprobs | None,
                  ref_model: nn.Module | None) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple]:
    """idx, ids, labels → (ref_chosen, ref_rejected) for a batch."""
    if reference is None and cfg.reference == "precomputed":
        reference = ReferenceLogprobs.compute(model, prefs, ref_model)
    if reference is not None:
        if reference.logps.shape[0] != len(prefs):
            raise ConfigError(f"the reference log-probabilities cover {reference.logps.shape[0]} pairs, the "
                              f"preference data has {len(prefs)}; compute them for this data")
        return lambda idx, ids, labels: tuple(t.to(ids.device) for t in reference.select(idx))

    def run(idx: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> tuple:
        ctx = contextlib.nullcontext(ref_model) if ref_model is not None else adapters_disabled(model)
        with torch.no_grad(), ctx as ref:
            lp = sequence_logprobs(ref, ids, labels)
        return lp[:len(idx)], lp[len(idx):]
    return run


def train_dpo(model: nn.Module, prefs: PreferenceSet, cfg: DPOConfig = DPOConfig(),
              reference: ReferenceLogprobs | None = None, ref_model: nn.Module | None = None,
              progress: bool | None = None, on_step: Callable[[int, dict], None] | None = None,
              dist: DistContext | None = None) -> dict[str, Any]:
    """Train ``model`` in place on the pairs for ``cfg.steps`` steps; returns the curve (loss, rewards,
    reward accuracy per step), which reference was used, and the time taken. With ``dist`` the policy
    runs in DDP, each rank on its share of every global batch of pairs (the curve is the global one;
    rank 0 shows progress and calls ``on_step``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters; apply a LoRAConfig/QLoRAConfig or unfreeze it")
    if ref_model is None and reference is None and not adapters(model):
        raise ConfigError("DPO needs a reference: LoRA adapters on the model (switched off for the reference), "
                          "a frozen ref_model, or precomputed ReferenceLogprobs")
    torch.manual_seed(cfg.seed)
    opt = build_optimizer(model, SFTConfig(lr=cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, SCHEDULES[cfg.schedule](cfg.steps, cfg.warmup_frac))
    t0 = time.perf_counter()
    ref_fn = _reference_fn(model, prefs, cfg, reference, ref_model)
    dev, main = params[0].device, dist is None or dist.main
    data, curve = pair_batches(len(prefs), min(cfg.batch_size, len(prefs)), cfg.seed), []
    model.train()
    net = dist.wrap(model) if dist is not None else model
    for step in track(range(cfg.steps), "DPO", total=cfg.steps, enabled=progress if main else False):
        idx = next(data)
        idx = dist.shard(idx) if dist is not None else idx  # equal shards: the mean of means is the mean
        ids, labels = (t.to(dev) for t in prefs.batch(idx))
        ref_c, ref_r = ref_fn(idx, ids, labels)
        lp = sequence_logprobs(net, ids, labels)  # chosen and rejected in one forward
        loss, stats = dpo_loss(lp[:len(idx)], lp[len(idx):], ref_c, ref_r, cfg.beta, cfg.loss, cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        rec = {"step": step + 1, "loss": loss.item(), **stats}
        if dist is not None:
            rec = {k: dist.all_sum(v) / dist.world_size for k, v in rec.items()}
        rec.update(step=step + 1, lr=opt.param_groups[0]["lr"])
        curve.append(rec)
        if on_step is not None and main:
            on_step(step, rec)
    model.eval()
    return {"curve": curve, "steps": cfg.steps, "config": cfg.to_dict(), "seconds": time.perf_counter() - t0,
            "reference": "precomputed" if (reference is not None or cfg.reference == "precomputed")
            else ("ref_model" if ref_model is not None else "adapter")}
