"""Is int8 actually faster here? A one-time check of the depthwise layers of an integer program.

PyTorch's int8 depthwise kernels are fast for a few shapes only (3×3/5×5, channels a multiple of 8,
stride ≤ 2 on fbgemm); elsewhere they can lose to the fp32 kernel, and a depthwise-heavy network
(MobileNet, EfficientNet) then runs slower in int8 than in fp32. On the first fast-mode call of an
:class:`~efficientml.quant.integer.IntegerModel`, each depthwise conv is timed both ways on the
inputs it actually receives, and one :class:`Int8SpeedWarning` names the layers where int8 lost
(when together they lose at least 10 % of the depthwise layers' fp32 time).
``IntegerConfig(warn_slow_layers=False)`` turns the check off.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable

import torch

from efficientml.quant.integer_weighted import ConvStep

REPS = 3            # timed calls per kernel after one warm-up (median)
MARGIN = 1.1        # a layer's int8 counts as slower only beyond this ratio (timer noise)
MATERIAL = 0.1      # warn when the slow layers lose ≥ this share of all depthwise layers' fp32 time


class Int8SpeedWarning(UserWarning):
    """int8 kernels of some layers are slower than their fp32 equivalents on this machine."""


def _call_ms(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _median_ms(fn: Callable[[], Any], reps: int = REPS) -> float:
    fn()                                                   # warm-up (packing, allocation)
    return sorted(_call_ms(fn) for _ in range(reps))[reps // 2]


def time_layer(step: ConvStep, q: torch.Tensor) -> tuple[float, float]:
    """(int8 ms, fp32 ms) of one conv step on the quantized input ``q``."""
    x = q.dequantize()
    with torch.no_grad():
        return _median_ms(lambda: step.fast(q)), _median_ms(lambda: step.float(x))


def slow_layers(timings: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """The layers whose int8 time exceeds MARGIN × their fp32 time."""
    return {n: t for n, t in timings.items() if t[0] > MARGIN * t[1]}


def warn_if_slow(timings: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Warn (once per call) when the layers int8 loses on cost a material share of the depthwise
    layers' fp32 time — not for one sub-millisecond layer within timer noise. Returns those layers."""
    slow = slow_layers(timings)
    lost = sum(a - b for a, b in slow.values())
    if slow and lost >= MATERIAL * sum(b for _, b in timings.values()):
        i8, f32 = sum(t[0] for t in slow.values()), sum(t[1] for t in slow.values())
        names = ", ".join(f"{n} ({a:.2f} vs {b:.2f} ms)" for n, (a, b) in slow.items())
        warnings.warn(f"int8 is slower than fp32 on {len(slow)} of {len(timings)} depthwise layers "
                      f"here ({i8:.1f} vs {f32:.1f} ms in all): {names}; keep them in float or check "
                      f"the channel count (a multiple of 8) and kernel (3×3/5×5)", Int8SpeedWarning,
                      stacklevel=4)
    return slow


def run_with_speed_check(program: Any, x: torch.Tensor, run: Callable[..., Any]) -> Any:
    """Run ``program`` in fast mode on ``x``, timing each depthwise conv on its input; warns once."""
    timings: dict[str, tuple[float, float]] = {}

    def hook(ins: Any, out: Any, args: list[Any]) -> None:
        if isinstance(ins.step, ConvStep) and ins.step.depthwise and args and torch.is_tensor(args[0]):
            timings[ins.step.name] = time_layer(ins.step, args[0])

    out = run(program, "fast", (x,), hook)
    warn_if_slow(timings)
    return out


def first_call_batch_latency_ratio(model: Any, x: torch.Tensor, reps: int = 15, rounds: int = 3) -> float:
    """Batch-1 fast-mode latency of a copy of ``model`` whose first call had ``x``'s batch, divided by
    that of a copy whose first call had batch 1 (fastest of ``reps`` calls, best of ``rounds``
    interleaved rounds, so another process on the CPU slows both alike). 1.0: the first call's batch
    does not matter."""
    import copy

    after_b, after_1 = (copy.deepcopy(model).with_mode("fast") for _ in range(2))
    one = x[:1]
    ratios = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", Int8SpeedWarning)
        after_b(x), after_1(one)
        for _ in range(rounds):
            a = min(_call_ms(lambda: after_b(one)) for _ in range(reps))
            b = min(_call_ms(lambda: after_1(one)) for _ in range(reps))
            ratios.append(a / b)
    return min(ratios)
