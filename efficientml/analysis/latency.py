"""Latency measured properly: warm-up runs dropped, device synchronized, median and spread reported.

    with num_threads(1):
        r = measure_latency(model, torch.randn(1, 3, 32, 32), warmup=10, runs=50)
    r.median_ms, r.p10_ms, r.p90_ms, r.threads, r.device
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch

from efficientml.core.device import synchronize
from efficientml.core.errors import ConfigError


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[int]:
    """Set torch's intra-op thread count for the block and restore it after (``None``: unchanged)."""
    old = torch.get_num_threads()
    if n is not None:
        if int(n) < 1:
            raise ConfigError(f"threads must be a positive integer, got {n!r}")
        torch.set_num_threads(int(n))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


@dataclass(frozen=True)
class LatencyResult:
    """Per-call latency statistics over ``runs`` timed calls (milliseconds)."""

    median_ms: float
    mean_ms: float
    std_ms: float
    p10_ms: float
    p90_ms: float
    iqr_ms: float
    min_ms: float
    max_ms: float
    runs: int
    warmup: int
    threads: int
    device: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.median_ms:.3f} ms median (p10 {self.p10_ms:.3f}, p90 {self.p90_ms:.3f}; "
                f"{self.runs} runs, {self.threads} threads, {self.device})")


def _quantile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list (numpy's default method)."""
    pos = (len(sorted_xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(times_s: list[float], warmup: int, threads: int, device: str) -> LatencyResult:
    """Statistics of per-call times given in seconds."""
    ms = sorted(t * 1e3 for t in times_s)
    q1, q3 = _quantile(ms, 0.25), _quantile(ms, 0.75)
    return LatencyResult(
        median_ms=statistics.median(ms), mean_ms=statistics.fmean(ms),
        std_ms=statistics.stdev(ms) if len(ms) > 1 else 0.0,
        p10_ms=_quantile(ms, 0.10), p90_ms=_quantile(ms, 0.90), iqr_ms=q3 - q1,
        min_ms=ms[0], max_ms=ms[-1], runs=len(ms), warmup=warmup, threads=threads, device=device)


def _device_of(model: Any, args: tuple, kwargs: dict) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cpu")


def measure_latency(model: Callable[..., Any], inputs: Any = (), warmup: int = 10, runs: int = 50,
                    threads: int | None = None, device: str | torch.device | None = None
                    ) -> LatencyResult:
    """Time ``model(*inputs)`` (a tensor, a tuple, or a dict of keyword inputs).

    Runs under ``torch.inference_mode``; ``warmup`` calls are made and dropped, then each of ``runs``
    calls is timed between device synchronizations. ``threads`` sets torch's intra-op thread count
    for the measurement only. ``device`` is only recorded (inputs and model must already be there);
    by default it is the model's device.
    """
    if warmup < 0 or runs < 1:
        raise ConfigError(f"need warmup >= 0 and runs >= 1, got warmup={warmup}, runs={runs}")
    if isinstance(inputs, torch.Tensor):
        args, kwargs = (inputs,), {}
    elif isinstance(inputs, dict):
        args, kwargs = (), dict(inputs)
    else:
        args, kwargs = tuple(inputs), {}
    dev = torch.device(device) if device is not None else _device_of(model, args, kwargs)
    from efficientml.analysis.trace import eval_mode

    modes = eval_mode(model) if isinstance(model, torch.nn.Module) else contextlib.nullcontext()
    times: list[float] = []
    with modes, num_threads(threads) as n, torch.inference_mode():
        for _ in range(warmup):
            model(*args, **kwargs)
        synchronize(dev)
        for _ in range(runs):
            t0 = time.perf_counter()
            model(*args, **kwargs)
            synchronize(dev)                    # queued GPU kernels belong to this call
            times.append(time.perf_counter() - t0)
    name = str(dev)
    if dev.type == "cuda" and torch.cuda.is_available():
        name = f"{dev} ({torch.cuda.get_device_name(dev)})"
    return summarize(times, warmup, n, name)
