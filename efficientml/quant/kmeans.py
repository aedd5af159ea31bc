"""K-means (weight-sharing) quantization: each layer's weights become indices into 2^N shared centroids.

1-D k-means is fast: with sorted centroids the nearest one is found by ``bucketize`` against the
midpoints (O(M log k)), and the update is a ``scatter_add``. k-means++ seeds from a subsample.
Pruning-aware: weights that are exactly zero keep index −1 (stored as 0, no centroid) and stay zero
during fine-tuning. Storage: N·M index bits + 32·2^N codebook bits per layer.

Fine-tuning (Deep Compression's centroid fine-tuning): :class:`KMeansLinear`/:class:`KMeansConv2d` hold the
centroids as the trainable parameter and rebuild the weight as ``centroids[labels]``; autograd of
that gather sums the gradients of all weights of a cluster into its centroid (gradient grouping).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.config import Config, check_range
from efficientml.core.errors import ConfigError, UnsupportedError
from efficientml.core.modules import named_layers, set_module


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for each x (centroids need not be sorted)."""
    order = torch.argsort(centroids)
    c = centroids[order]
    mid = (c[1:] + c[:-1]) / 2
    return order[torch.bucketize(x, mid)]


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator, sample: int = 20_000) -> torch.Tensor:
    """k-means++ seeding (D² sampling) on a random subsample of at most ``sample`` points."""
    if x.numel() > sample:
        x = x[torch.randint(0, x.numel(), (sample,), generator=generator)]
    c = x[torch.randint(0, x.numel(), (1,), generator=generator)]
    d2 = (x - c) ** 2
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:                        # fewer distinct values than k: pad with duplicates
            nxt = x[torch.randint(0, x.numel(), (1,), generator=generator)]
        else:
            cdf = torch.cumsum(d2.double(), 0)           # sample ∝ D² by inverting the CDF
            u = torch.rand(1, generator=generator, dtype=torch.float64) * cdf[-1]
            nxt = x[torch.searchsorted(cdf, u).clamp(max=x.numel() - 1)]
        c = torch.cat([c, nxt])
        d2 = torch.minimum(d2, (x - nxt) ** 2)
    return c


def kmeans_1d(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0, tol: float = 1e-7
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the values of ``x`` into ``k`` centroids; returns (centroids (k,), labels like x)."""
    flat = x.detach().reshape(-1).float()
    if flat.numel() == 0:
        raise ConfigError("k-means got an empty tensor; there are no weights to cluster")
    g = torch.Generator().manual_seed(seed)
    c = kmeans_plus_plus(flat, k, g)
    flat_d = flat.double()
    for _ in range(iters):
        labels = _assign(flat, c)
        sums = torch.bincount(labels, weights=flat_d, minlength=k)
        counts = torch.bincount(labels, minlength=k).double()
        new = torch.where(counts > 0, sums / counts.clamp(min=1), c.double()).float()  # empty: keep
        shift = (new - c).abs().max()
        c = new
        if shift <= tol * (flat.abs().max() + 1e-12):
            break
    return c, _assign(flat, c).reshape(x.shape)


@dataclass
class Codebook:
    """A layer's k-means quantization: weight = centroids[labels], zero where labels == −1."""

    centroids: torch.Tensor     # (2^N,) float32
    labels: torch.Tensor        # int64, the weight's shape; −1 marks a pruned weight
    bits: int

    def decode(self) -> torch.Tensor:
        ext = torch.cat([self.centroids, self.centroids.new_zeros(1)])
        return ext[torch.where(self.labels < 0, torch.full_like(self.labels, len(self.centroids)), self.labels)]

    def storage_bits(self, pruning_aware: bool = False) -> int:
        """N·M + 32·2^N (M = all weights, or only the nonzero ones when ``pruning_aware``)."""
        m = int((self.labels >= 0).sum()) if pruning_aware else self.labels.numel()
        return self.bits * m + 32 * len(self.centroids)


def kmeans_quantize_tensor(w: torch.Tensor, bits: int, prune_aware: bool = True, iters: int = 30,
                           seed: int = 0) -> Codebook:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ConfigError(f"k-means quantization supports 1 to 8 bits, got {bits!r}")
    flat = w.detach().reshape(-1).float()
    keep = flat != 0 if prune_aware else torch.ones_like(flat, dtype=torch.bool)
    labels = torch.full(flat.shape, -1, dtype=torch.int64)
    k = 2 ** bits
    if keep.any():
        c, lab = kmeans_1d(flat[keep], k, iters, seed)
        labels[keep] = lab
    else:
        c = torch.zeros(k)
    return Codebook(c, labels.reshape(w.shape), bits)


@dataclass(frozen=True)
class KMeansConfig(Config):
    """Per-layer k-means codebooks. ``bits`` for every Conv2d/Linear; ``layer_bits`` overrides by name."""

    kind = "kmeans"
    bits: int = 4
    layer_bits: dict = field(default_factory=dict)
    prune_aware: bool = True
    iters: int = 30
    seed: int = 0

    def validate(self) -> None:
        for b in [self.bits, *self.layer_bits.values()]:
            if not isinstance(b, int) or not 1 <= b <= 8:
                raise ConfigError(f"k-means quantization supports 1 to 8 bits, got {b!r}")
        check_range("iters", self.iters, 1, 10_000)


class _KMeansMixin:
    centroids: nn.Parameter
    labels: torch.Tensor

    def _init_kmeans(self, cb: Codebook) -> None:
        self.centroids = nn.Parameter(cb.centroids.clone())
        self.register_buffer("labels", cb.labels.clone())    # type: ignore[attr-defined]
        self.bits = cb.bits

    def kmeans_weight(self) -> torch.Tensor:
        # gather: the backward scatter-adds each weight's gradient into its centroid
        ext = torch.cat([self.centroids, self.centroids.new_zeros(1)])   # index k: pruned → 0 (no grad)
        idx = torch.where(self.labels < 0, torch.full_like(self.labels, self.centroids.numel()), self.labels)
        return ext[idx]

    def codebook(self) -> Codebook:
        return Codebook(self.centroids.detach().clone(), self.labels.clone(), self.bits)


class KMeansConv2d(nn.Conv2d, _KMeansMixin):
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, cb: Codebook) -> "KMeansConv2d":
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
        del m.weight
        m._init_kmeans(cb)
        if conv.bias is not None:
            m.bias = nn.Parameter(conv.bias.detach().clone())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.kmeans_weight(), self.bias)

    def to_float(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode)
        conv.weight = nn.Parameter(self.kmeans_weight().detach().clone())
        if self.bias is not None:
            conv.bias = nn.Parameter(self.bias.detach().clone())
        return conv


class KMeansLinear(nn.Linear, _KMeansMixin):
    @classmethod
    def from_linear(cls, lin: nn.Linear, cb: Codebook) -> "KMeansLinear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None)
        del m.weight
        m._init_kmeans(cb)
        if lin.bias is not None:
            m.bias = nn.Parameter(lin.bias.detach().clone())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.kmeans_weight(), self.bias)

    def to_float(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        lin.weight = nn.Parameter(self.kmeans_weight().detach().clone())
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().clone())
        return lin


def kmeans_quantize(model: nn.Module, config: KMeansConfig | None = None) -> dict[str, Codebook]:
    """Replace every Conv2d/Linear by its k-means version (in place); returns the codebooks by name."""
    cfg = config or KMeansConfig()
    books: dict[str, Codebook] = {}
    layers = list(named_layers(model, (nn.Conv2d, nn.Linear)))
    unknown = sorted(set(cfg.layer_bits) - {n for n, _ in layers})
    if unknown:
        raise ConfigError(f"layer_bits names layers the model does not have: {unknown}")
    for name, layer in layers:
        if isinstance(layer, _KMeansMixin):
            raise UnsupportedError(f"layer {name!r} is already k-means quantized")
        bits = int(cfg.layer_bits.get(name, cfg.bits))
        cb = kmeans_quantize_tensor(layer.weight, bits, cfg.prune_aware, cfg.iters, cfg.seed)
        new = (KMeansConv2d.from_conv(layer, cb) if isinstance(layer, nn.Conv2d)
               else KMeansLinear.from_linear(layer, cb))
        set_module(model, name, new)
        books[name] = cb
    return books


def kmeans_codebooks(model: nn.Module) -> dict[str, Codebook]:
    return {n: m.codebook() for n, m in model.named_modules() if isinstance(m, _KMeansMixin)}


def strip_kmeans(model: nn.Module) -> nn.Module:
    """Turn k-means layers back into plain Conv2d/Linear with the shared weights (in place)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, (KMeansConv2d, KMeansLinear)):
            set_module(model, name, m.to_float())
    return model


def kmeans_storage(books: dict[str, Codebook], pruning_aware: bool = False) -> dict[str, int]:
    """Bits per layer (N·M + 32·2^N) and the total."""
    per = {n: cb.storage_bits(pruning_aware) for n, cb in books.items()}
    per["total"] = sum(per.values())
    return per
