"""Data augmentation for small students that over-fit: cutout (DeVries & Taylor 2017) and mixup
(Zhang et al. 2018), as batch functions and as loader wrappers for :func:`efficientml.train.fit`.

    loader = MixupLoader(CutoutLoader(train_loader, size=8), alpha=0.2)
    fit(model, loader, cfg, loss_fn=loader.loss_fn)

- cutout: one ``size × size`` square per image, centred uniformly on the image and clipped at its border,
  is set to 0 in every channel (0 is the dataset mean once the loader has normalised the batch);
- mixup: ``x̃ = λ·x + (1 − λ)·x[π]`` with λ ~ Beta(α, α) once per batch and π a random permutation of the
  batch; the loss is ``λ·CE(f(x̃), y) + (1 − λ)·CE(f(x̃), y[π])``.
"""

from __future__ import annotations

import random
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

from efficientml.core.errors import ConfigError


def cutout(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, C, H, W) images → a copy with, per image, the pixels of one ``size × size`` square set to 0 in all
    channels. Square centres are uniform over the H × W positions (drawn on the CPU from ``generator``);
    a square that crosses the border is clipped, so fewer than ``size²`` pixels are zeroed there."""
    if x.ndim != 4:
        raise ConfigError(f"cutout expects (B, C, H, W) images, got shape {tuple(x.shape)}")
    if size < 0:
        raise ConfigError(f"cutout size must be a non-negative number of pixels, got {size}")
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b,), generator=generator)                  # (B,) centre rows
    cx = torch.randint(0, w, (b,), generator=generator)
    y0, x0 = cy - size // 2, cx - size // 2                              # top-left, may be off the image
    rows = torch.arange(h)[None, :] - y0[:, None]                        # (B, H) offset inside the square
    cols = torch.arange(w)[None, :] - x0[:, None]                        # (B, W)
    inside = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]  # (B, H, W)
    return x * (~inside).to(x.device, x.dtype)[:, None]                  # broadcast over channels


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, generator: torch.Generator | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mix a batch ``x`` (B, …) with labels ``y`` (B,) → ``(x_mixed, y_a, y_b, lam)``:
    ``x_mixed = lam·x + (1 − lam)·x[perm]``, ``y_a = y``, ``y_b = y[perm]``; ``lam`` ~ Beta(alpha, alpha)
    (a Python float), ``perm`` a uniform permutation of the batch. ``alpha = 0`` gives ``lam = 1`` (no
    mixing). Both draws come from ``generator`` (the Beta draw through a seed taken from it)."""
    if alpha < 0:
        raise ConfigError(f"mixup alpha must be ≥ 0 (0 = no mixing), got {alpha}")
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    lam = random.Random(seed).betavariate(alpha, alpha) if alpha > 0 else 1.0
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)   # (B,)
    return lam * x + (1.0 - lam) * x[perm], y, y[perm], lam


def mixup_loss(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """(B, classes) logits of a mixed batch → ``lam·CE(logits, y_a) + (1 − lam)·CE(logits, y_b)`` (batch
    means)."""
    ce_a = F.cross_entropy(logits, y_a, label_smoothing=label_smoothing)
    ce_b = F.cross_entropy(logits, y_b, label_smoothing=label_smoothing)
    return lam * ce_a + (1.0 - lam) * ce_b


class CutoutLoader:
    """Wraps a loader of (x, y) image batches: yields ``(cutout(x, size), y)``. Draws come from one
    generator seeded with ``seed``, so a run is reproducible and each epoch gets new squares."""

    def __init__(self, loader: Iterable, size: int, seed: int = 0):
        self.loader, self.size = loader, size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            yield cutout(x, self.size, self.generator), y


class MixupLoader:
    """Wraps a loader of (x, y): yields ``(x_mixed, y_a)`` and keeps the batch's ``y_b`` and ``lam``, which
    :meth:`loss_fn` (``fit``'s ``loss_fn``) reads; ``fit`` calls it on the batch it just drew, so the two
    stay in step. ``fit``'s train accuracy is then measured against ``y_a``."""

    def __init__(self, loader: Iterable, alpha: float, seed: int = 0, label_smoothing: float = 0.0):
        if alpha < 0:
            raise ConfigError(f"mixup alpha must be ≥ 0 (0 = no mixing), got {alpha}")
        self.loader, self.alpha, self.label_smoothing = loader, alpha, label_smoothing
        self.generator = torch.Generator().manual_seed(seed)
        self._y_b: torch.Tensor | None = None
        self._lam = 1.0

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            x_mixed, y_a, self._y_b, self._lam = mixup(x, y, self.alpha, self.generator)
            yield x_mixed, y_a

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, classes) logits of the latest mixed batch and its ``y_a`` (B,) → :func:`mixup_loss`."""
        if self._y_b is None:
            raise ConfigError("MixupLoader.loss_fn was called before the loader yielded a batch")
        return mixup_loss(logits, y, self._y_b.to(y.device), self._lam, self.label_smoothing)
