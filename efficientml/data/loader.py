"""In-memory tensor loaders: small image datasets live in RAM as one uint8 tensor, so batching,
shuffling and augmentation are a few tensor ops instead of a per-sample Python loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F


@dataclass
class ImageTensors:
    """Images (N, C, H, W) as uint8 and labels (N,) as int64, with the normalization to apply."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, n: int, seed: int = 0) -> "ImageTensors":
        """A deterministic random subset of ``n`` examples (all of them if n ≥ len)."""
        if n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:n]
        return ImageTensors(self.images[idx], self.labels[idx], self.mean, self.std, self.classes)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) → normalized float32."""
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x.float() / 255.0 - mean) / std


class TensorLoader:
    """Iterates (x, y) batches from :class:`ImageTensors`.

    ``augment`` applies random crops (pad by ``crop_padding``, reflect) and horizontal flips per
    sample, vectorized. ``pad_to`` zero-pads images to a square size first (28 → 32 for VGG/CIFAR
    nets). Iteration order is reproducible from ``seed`` and the epoch count.
    """

    def __init__(self, data: ImageTensors, batch_size: int = 128, shuffle: bool = False,
                 augment: bool = False, pad_to: int | None = None, crop_padding: int = 2,
                 drop_last: bool = False, seed: int = 0):
        self.data, self.batch_size, self.shuffle, self.augment = data, batch_size, shuffle, augment
        self.pad_to, self.crop_padding, self.drop_last, self.seed = pad_to, crop_padding, drop_last, seed
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def dataset(self) -> ImageTensors:
        return self.data

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        self.epoch += 1
        n = len(self.data)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.data.images[idx]                      # uint8: pads are true black pixels
            if self.pad_to is not None:
                x = _pad_to(x, self.pad_to)
            if self.augment:
                x = _random_crop_flip(x, self.crop_padding, g)
            yield self.data.normalize(x), self.data.labels[idx]


def _pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top))


def _random_crop_flip(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    b, c, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=g)
        rows = (dy.view(b, 1) + torch.arange(h).view(1, h))                 # (B, H)
        cols = (dx.view(b, 1) + torch.arange(w).view(1, w))                 # (B, W)
        bi = torch.arange(b).view(b, 1, 1)
        x = xp.permute(0, 2, 3, 1)[bi, rows.view(b, h, 1), cols.view(b, 1, w)]  # (B, H, W, C)
        x = x.permute(0, 3, 1, 2).contiguous()
    flip = torch.rand(b, generator=g) < 0.5
    x[flip] = x[flip].flip(-1)
    return x
