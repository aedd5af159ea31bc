"""Learning-rate schedules as multipliers of the peak LR, for ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

import math
from typing import Callable


def triangular(total_steps: int, peak_frac: float = 0.3) -> Callable[[int], float]:
    """Triangular schedule: linear warm-up from 0 to the peak at ``peak_frac`` of training,
    then linearly down to 0 at the end. Step 0 gets a small nonzero LR so the first step moves."""
    peak = max(1.0, peak_frac * total_steps)

    def f(step: int) -> float:
        s = step + 1
        if s <= peak:
            return s / peak
        return max(0.0, (total_steps - s) / max(1.0, total_steps - peak))

    return f


def cosine(total_steps: int, warmup_frac: float = 0.0) -> Callable[[int], float]:
    warm = int(warmup_frac * total_steps)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return f


def constant(total_steps: int, warmup_frac: float = 0.0) -> Callable[[int], float]:
    return lambda step: 1.0


SCHEDULES = {"triangular": triangular, "cosine": cosine, "constant": constant}
