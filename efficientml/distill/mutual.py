"""Deep Mutual Learning (Zhang et al. 2018): peers trained together from scratch teach one another.

No pretrained teacher: on every batch each of the K ≥ 2 peers takes the loss

    L_i = CE(z_i, y) + kl_weight · T² · (1/(K−1)) · Σ_{j≠i} KL(softmax(z_j/T).detach() ‖ softmax(z_i/T))

and its own optimizer step. The other peers' outputs are constants in L_i, so one backward of Σ_i L_i gives
every peer exactly the gradient of its own loss. The loop is :func:`efficientml.train.fit`'s, for several
models: each peer gets :func:`~efficientml.train.loop.make_optimizer`'s optimizer and the same LR schedule
(``SCHEDULES[train.schedule]`` over the same number of steps), bf16 autocast on CUDA, ``grad_clip`` per
peer, ``max_steps``. With an ``eval_loader``, every epoch scores each peer and their :class:`Ensemble`
(mean of the peers' probabilities).
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.device import seed_everything
from efficientml.core.errors import ConfigError
from efficientml.core.progress import track
from efficientml.distill.ensemble import Ensemble
from efficientml.distill.losses import kd_loss
from efficientml.train.config import TrainConfig
from efficientml.train.loop import evaluate, make_optimizer
from efficientml.train.schedule import SCHEDULES


def mutual_loss(logits: Sequence[torch.Tensor], y: torch.Tensor, temperature: float = 1.0, kl_weight: float = 1.0,
                label_smoothing: float = 0.0) -> tuple[list[torch.Tensor], dict[str, list[float]]]:
    """The K peers' (B, classes) logits and labels (B,) → each peer's scalar loss ``L_i`` (module docstring;
    ``kl_weight·T²·KL`` is ``kl_weight·kd_loss``) and the parts ``{"ce": [K], "kl": [K]}`` (the KL term
    before ``kl_weight``)."""
    k = len(logits)
    if k < 2:
        raise ConfigError(f"mutual learning needs at least 2 peers, got {k}")
    losses, ce_parts, kl_parts = [], [], []
    for i, z_i in enumerate(logits):
        ce = F.cross_entropy(z_i, y, label_smoothing=label_smoothing)
        kl = sum(kd_loss(z_i, z_j.detach(), temperature) for j, z_j in enumerate(logits) if j != i) / (k - 1)
        losses.append(ce + kl_weight * kl)
        ce_parts.append(float(ce.detach()))
        kl_parts.append(float(kl.detach()))
    return losses, {"ce": ce_parts, "kl": kl_parts}


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _check_peers(models: Sequence[nn.Module]) -> torch.device:
    if len(models) < 2:
        raise ConfigError(f"mutual learning needs at least 2 peer models, got {len(models)}")
    if len({id(m) for m in models}) != len(models):
        raise ConfigError("the peers must be distinct model objects; the same model was passed twice")
    devices = {_device(m) for m in models}
    if len(devices) != 1:
        raise ConfigError(f"the peers must be on one device, got {sorted(map(str, devices))}")
    return devices.pop()


def mutual_learning(models: list[nn.Module], train_loader: Iterable, train: TrainConfig, temperature: float = 1.0,
                    kl_weight: float = 1.0, eval_loader: Iterable | None = None,
                    progress: bool | None = None) -> dict[str, Any]:
    """Train the peers ``models`` in place with DML on batches (x (B, …), y (B,)) of ``train_loader``.

    Returns ``{"steps", "seconds", "epochs": [record]}``; a record holds ``epoch``, ``step``, ``lr`` and,
    as lists with one entry per peer, ``train_loss``, ``loss_ce``, ``loss_kl``, ``train_accuracy``; with
    ``eval_loader`` also ``eval_accuracy`` (per peer) and ``ensemble_accuracy``, which are repeated at the
    top level for the last epoch."""
    device = _check_peers(models)
    n_batches = len(train_loader)  # type: ignore[arg-type]
    if n_batches == 0:
        raise ConfigError("the training loader yields no batches; expected at least one")
    total = max(1, math.ceil(train.epochs * n_batches))
    if train.max_steps is not None:
        total = min(total, train.max_steps)
    seed_everything(train.seed)
    opts = [make_optimizer(m, train) for m in models]
    lr_at = SCHEDULES[train.schedule](total, train.warmup_frac)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_at) for o in opts]
    step, epochs, t0 = 0, [], time.perf_counter()
    while step < total:
        sums = _zeros(len(models))
        for x, y in track(train_loader, f"epoch {len(epochs) + 1}", total=n_batches, enabled=progress):
            if step >= total:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            _step(models, opts, scheds, x, y, train, temperature, kl_weight, sums)
            step += 1
        rec = _record(sums, len(epochs) + 1, step, opts[0].param_groups[0]["lr"])
        if eval_loader is not None:
            rec["eval_accuracy"] = [evaluate(m, eval_loader)["accuracy"] for m in models]
            rec["ensemble_accuracy"] = evaluate(Ensemble(models), eval_loader)["accuracy"]
        rec["seconds"] = time.perf_counter() - t0
        epochs.append(rec)
    out: dict[str, Any] = {"steps": step, "seconds": round(time.perf_counter() - t0, 2), "epochs": epochs}
    if eval_loader is not None:
        out["eval_accuracy"], out["ensemble_accuracy"] = epochs[-1]["eval_accuracy"], epochs[-1]["ensemble_accuracy"]
    return out


def _zeros(k: int) -> dict[str, Any]:
    return {"loss": [0.0] * k, "ce": [0.0] * k, "kl": [0.0] * k, "correct": [0] * k, "seen": 0}


def _step(models: Sequence[nn.Module], opts: list, scheds: list, x: torch.Tensor, y: torch.Tensor,
          train: TrainConfig, temperature: float, kl_weight: float, sums: dict[str, Any]) -> None:
    """One DML step on the batch: every peer's forward, the K losses, one backward, K optimizer steps."""
    use_amp = train.amp and x.device.type == "cuda"
    for m in models:
        m.train()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp):
        logits = [m(x) for m in models]                                   # K × (B, classes)
        losses, parts = mutual_loss(logits, y, temperature, kl_weight, train.label_smoothing)
    for o in opts:
        o.zero_grad(set_to_none=True)
    torch.stack(losses).sum().backward()                                  # peer j's logits are detached in L_i
    for m, o, s in zip(models, opts, scheds):
        if train.grad_clip is not None:
            nn.utils.clip_grad_norm_(m.parameters(), train.grad_clip)
        o.step()
        s.step()
    b = y.shape[0]
    for i, z in enumerate(logits):
        sums["loss"][i] += float(losses[i].detach()) * b
        sums["ce"][i] += parts["ce"][i] * b
        sums["kl"][i] += parts["kl"][i] * b
        sums["correct"][i] += int((z.argmax(1) == y).sum())
    sums["seen"] += b


def _record(sums: dict[str, Any], epoch: int, step: int, lr: float) -> dict[str, Any]:
    n = max(1, sums["seen"])
    return {"epoch": epoch, "step": step, "lr": lr,
            "train_loss": [v / n for v in sums["loss"]], "loss_ce": [v / n for v in sums["ce"]],
            "loss_kl": [v / n for v in sums["kl"]], "train_accuracy": [100.0 * c / n for c in sums["correct"]]}
