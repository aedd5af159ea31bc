"""Observers: watch a tensor's values during calibration and choose the range [lo, hi] to quantize.

- ``minmax``: the extremes seen.
- ``ema``: exponential moving average of per-batch extremes (the QAT way; momentum 0.01 by default).
- ``percentile``: clip |x| at the p-th percentile of a histogram.
- ``mse``: the clipping threshold that minimizes the expected squared quantization error (search).
- ``kl``: the TensorRT method — the threshold whose quantized histogram is closest in KL divergence.

Histograms are of |x| over [0, R] with 2048 bins; when a larger value arrives R doubles and pairs of
bins merge, so memory is bounded and no second pass is needed. Clipping thresholds T apply to both
signs: the range is [max(min, −T), min(max, T)].
"""

from __future__ import annotations

import math

import torch

from efficientml.core.errors import ConfigError
from efficientml.core.registry import Registry

OBSERVERS: Registry[type] = Registry("observer")


class Observer:
    """Base: ``update(x)`` per batch, then ``range()`` → (lo, hi) floats."""

    def __init__(self, bits: int = 8, symmetric: bool = False):
        self.bits, self.symmetric = bits, symmetric
        self.min_val, self.max_val = math.inf, -math.inf
        self.batches = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.min_val = min(self.min_val, float(x.min()))
        self.max_val = max(self.max_val, float(x.max()))
        self.batches += 1

    def _check(self) -> None:
        if self.batches == 0:
            raise ConfigError(f"the {type(self).__name__} saw no data; calibration needs at least one batch")

    def range(self) -> tuple[float, float]:
        self._check()
        return self.min_val, self.max_val


@OBSERVERS.register("minmax")
class MinMaxObserver(Observer):
    pass


@OBSERVERS.register("ema")
class EMAObserver(Observer):
    def __init__(self, bits: int = 8, symmetric: bool = False, momentum: float = 0.01):
        super().__init__(bits, symmetric)
        self.momentum = momentum
        self.ema_min, self.ema_max = 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if self.batches == 0:
            self.ema_min, self.ema_max = lo, hi
        else:
            self.ema_min += self.momentum * (lo - self.ema_min)
            self.ema_max += self.momentum * (hi - self.ema_max)
        super().update(x)

    def range(self) -> tuple[float, float]:
        self._check()
        return self.ema_min, self.ema_max


class HistogramObserver(Observer):
    def __init__(self, bits: int = 8, symmetric: bool = False, bins: int = 2048):
        super().__init__(bits, symmetric)
        self.bins = bins
        self.hist = torch.zeros(bins, dtype=torch.float64)
        self.R = 0.0                                        # histogram covers |x| ∈ [0, R]

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().abs().flatten().float()
        amax = float(a.max()) if a.numel() else 0.0
        if self.R == 0.0:
            self.R = amax if amax > 0 else 1e-8
        while amax > self.R:                                # double the range: merge bin pairs
            self.hist = torch.cat([self.hist.view(-1, 2).sum(1), torch.zeros(self.bins // 2, dtype=torch.float64)])
            self.R *= 2
        self.hist += torch.histc(a, self.bins, 0.0, self.R).double()
        super().update(x)

    @property
    def width(self) -> float:
        return self.R / self.bins

    def threshold(self) -> float:
        raise NotImplementedError

    def range(self) -> tuple[float, float]:
        self._check()
        t = self.threshold()
        return max(self.min_val, -t), min(self.max_val, t)

    def _levels(self) -> int:
        """Quantization levels that cover [0, T]: all of them for non-negative data, half if signed."""
        n = 2 ** self.bits
        return n if self.min_val >= 0 else n // 2


@OBSERVERS.register("percentile")
class PercentileObserver(HistogramObserver):
    def __init__(self, bits: int = 8, symmetric: bool = False, percentile: float = 99.99):
        super().__init__(bits, symmetric)
        self.percentile = percentile

    def threshold(self) -> float:
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        i = int(torch.searchsorted(cdf, torch.tensor(self.percentile / 100, dtype=torch.float64)))
        return min(self.R, (i + 1) * self.width)


@OBSERVERS.register("mse")
class MSEObserver(HistogramObserver):
    """Search T over 100 candidates in (0, R]; error = Σ hist·(c − fq_T(c))² at bin centres."""

    def threshold(self) -> float:
        centers = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * self.width
        levels = self._levels() - 1
        best, best_t = math.inf, self.R
        for t in torch.linspace(self.R / 100, self.R, 100, dtype=torch.float64).tolist():
            step = t / levels
            fq = torch.clamp(torch.round(centers / step), 0, levels) * step
            err = float((self.hist * (centers - fq) ** 2).sum())
            if err < best:
                best, best_t = err, t
        return best_t


@OBSERVERS.register("kl")
class KLObserver(HistogramObserver):
    """TensorRT entropy calibration: for each candidate threshold bin i, P = hist[:i] with the tail
    folded into its last bin, Q = P merged into ``levels`` buckets and spread back over P's nonzero
    bins; pick argmin KL(P‖Q)."""

    def threshold(self) -> float:
        levels = self._levels()
        hist = self.hist
        total_bins = self.bins
        best, best_i = math.inf, total_bins
        start = max(levels, 128)
        for i in range(start, total_bins + 1, 16):
            p = hist[:i].clone()
            p[i - 1] += hist[i:].sum()
            nz = (hist[:i] > 0).double()
            # merge i bins into `levels` buckets (bucket boundaries by proportional index)
            idx = torch.div(torch.arange(i) * levels, i, rounding_mode="floor")
            bucket_sum = torch.zeros(levels, dtype=torch.float64).index_add_(0, idx, hist[:i])
            bucket_nz = torch.zeros(levels, dtype=torch.float64).index_add_(0, idx, nz)
            q = torch.where(nz > 0, bucket_sum[idx] / bucket_nz[idx].clamp(min=1), torch.zeros_like(p))
            ps, qs = p.sum(), q.sum()
            if ps == 0 or qs == 0:
                continue
            pn, qn = p / ps, q / qs
            mask = pn > 0
            kl = float((pn[mask] * torch.log(pn[mask] / qn[mask].clamp(min=1e-12))).sum())
            if kl < best:
                best, best_i = kl, i
        return best_i * self.width


def make_observer(name: str, bits: int = 8, **kw: float) -> Observer:
    return OBSERVERS.get(name)(bits=bits, **kw)
