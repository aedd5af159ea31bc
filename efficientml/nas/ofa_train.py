"""Progressive shrinking (OFA, Cai et al. 2020) and the evaluation of one subnet.

Phases, each sampling subnets from a larger part of the space than the one before:

``full``    the largest network only (its own cross-entropy; it then becomes the frozen teacher);
``kernel``  elastic kernel (largest depth and expand ratio);
``depth``   elastic kernel and depth;
``width``   everything: the hidden channels are sorted by importance first (:meth:`OFANet.sort_channels`).

Every phase samples the input resolution too. A step draws ``subnets_per_step`` subnets, accumulates
their gradients (cross-entropy + ``kd_weight`` · KD from the teacher at the same resolution) and takes
one SGD step; the learning rate follows a cosine per phase.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.config import Config, check_range
from efficientml.core.errors import ConfigError
from efficientml.distill.losses import kd_loss
from efficientml.nas.ofa import OFANet, recalibrate_bn, resize
from efficientml.nas.space import Arch

PHASES = ("full", "kernel", "depth", "width")


@dataclass(frozen=True)
class ShrinkConfig(Config):
    kind = "nas_progressive_shrinking"

    phases: tuple[str, ...] = PHASES
    epochs: tuple[float, ...] = (4.0, 2.0, 2.0, 2.0)   # per phase
    lr: tuple[float, ...] = (0.05, 0.02, 0.02, 0.02)   # peak lr per phase
    subnets_per_step: int = 2
    kd_weight: float = 1.0
    temperature: float = 1.0
    weight_decay: float = 4e-5
    seed: int = 0

    def validate(self) -> None:
        bad = [p for p in self.phases if p not in PHASES]
        if bad or list(self.phases) != sorted(self.phases, key=PHASES.index):
            raise ConfigError(f"phases must be an ordered subset of {PHASES}, got {self.phases}")
        if len(self.epochs) != len(self.phases) or len(self.lr) != len(self.phases):
            raise ConfigError("epochs and lr need one entry per phase")
        check_range("subnets_per_step", self.subnets_per_step, 1, 64)
        check_range("kd_weight", self.kd_weight, 0.0, 100.0)
        check_range("temperature", self.temperature, 0.0, 100.0, lo_open=True)


def phase_sampler(net: OFANet, phase: str):
    """rng → Arch for one phase of progressive shrinking."""
    sp, w = net.space, net.width
    emax = (max(sp.expands),)
    if phase == "full":
        return lambda rng: sp.largest(resolution=rng.choice(sp.resolutions), width=w)
    if phase == "kernel":
        return lambda rng: sp.sample(rng, width=w, expands=emax, depth=False)
    if phase == "depth":
        return lambda rng: sp.sample(rng, width=w, expands=emax)
    return lambda rng: sp.sample(rng, width=w)


def _step(net: OFANet, teacher: nn.Module | None, x: torch.Tensor, y: torch.Tensor, archs: list[Arch],
          cfg: ShrinkConfig) -> float:
    total, soft = 0.0, {}
    for arch in archs:
        net.set_active(arch)
        xr = resize(x, arch.resolution)
        logits = net(xr)
        loss = F.cross_entropy(logits, y)
        if teacher is not None and cfg.kd_weight > 0:
            if arch.resolution not in soft:
                with torch.no_grad():
                    soft[arch.resolution] = teacher(xr)
            loss = loss + cfg.kd_weight * kd_loss(logits, soft[arch.resolution], cfg.temperature)
        (loss / len(archs)).backward()
        total += loss.item() / len(archs)
    return total


def progressive_shrink(net: OFANet, train_loader: Iterable, cfg: ShrinkConfig | None = None,
                       log=None) -> dict:
    """Train ``net`` in place through ``cfg.phases``; returns the history (loss per phase, seconds)."""
    cfg = cfg or ShrinkConfig()
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    teacher, hist = None, {"config": cfg.to_dict(), "phases": []}
    n_batches = len(train_loader)  # type: ignore[arg-type]
    for phase, epochs, lr in zip(cfg.phases, cfg.epochs, cfg.lr):
        if phase != "full" and teacher is None:  # started after the full phase: the net as given teaches
            teacher = _freeze_largest(net)
        if phase == "width":
            net.sort_channels()
        sample = phase_sampler(net, phase)
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
        total = max(1, math.ceil(epochs * n_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        net.train()
        t0, step, losses = time.perf_counter(), 0, []
        while step < total:
            for x, y in train_loader:
                if step >= total:
                    break
                opt.zero_grad(set_to_none=True)
                loss = _step(net, teacher, x, y, [sample(rng) for _ in range(cfg.subnets_per_step)], cfg)
                opt.step()
                sched.step()
                losses.append(loss)
                step += 1
                if log is not None and step % 100 == 0:
                    log(f"{phase}: step {step}/{total} loss {sum(losses[-100:]) / len(losses[-100:]):.3f}")
        hist["phases"].append({"phase": phase, "steps": step, "seconds": time.perf_counter() - t0,
                               "loss_first": losses[0], "loss_last_epoch": sum(losses[-n_batches:]) / len(
                                   losses[-n_batches:])})
        if phase == "full":
            teacher = _freeze_largest(net)
    net.set_active(net.space.largest(width=net.width))
    return hist


def _freeze_largest(net: OFANet) -> OFANet:
    t = copy.deepcopy(net)
    t.set_active(t.space.largest(width=t.width))
    for p in t.parameters():
        p.requires_grad_(False)
    return t.eval()


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable, resolution: int, max_batches: int | None = None) -> float:
    """Top-1 accuracy (percent) of ``model`` in eval mode on images resized to ``resolution``."""
    model.eval()
    correct = seen = 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        correct += (model(resize(x, resolution)).argmax(1) == y).sum().item()
        seen += y.numel()
    return 100.0 * correct / max(1, seen)


def evaluate_subnet(net: OFANet, arch: Arch, calib_batches: list, eval_loader: Iterable,
                    max_batches: int | None = None) -> tuple[float, nn.Module]:
    """Extract ``arch``, re-calibrate its BatchNorm statistics on ``calib_batches`` (at its resolution) and
    measure its accuracy: (accuracy %, the plain model)."""
    sub = net.extract(arch)
    recalibrate_bn(sub, calib_batches, arch.resolution)
    return accuracy(sub, eval_loader, arch.resolution, max_batches), sub
