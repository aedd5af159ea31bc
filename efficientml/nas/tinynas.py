"""TinyNAS (MCUNet, Lin et al. 2020): first optimize the search space, then search inside it.

1. **Space optimization.** For each ``(width multiplier, resolution)`` pair of the meta-space, sample
   networks of the sub-space and keep those that fit the microcontroller: int8 peak activation memory
   ≤ ``sram_bytes`` and int8 weights ≤ ``flash_bytes``. The MACs distribution of the fitting networks
   (fraction fitting, mean, quantiles) says how much computation the sub-space offers under the
   budgets; the pair whose fitting networks have the largest mean MACs is picked ("more computation
   within the budget → higher accuracy", MCUNet's heuristic).
2. **Constrained search** in the picked sub-space (evolution by default) under the same budgets.

Memory is the analytical per-layer schedule of :mod:`efficientml.nas.costs` (the plain model run layer
by layer, int8 activations); ``peak_fn`` may replace it, e.g. with the int8 engine's planned arena.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable

from efficientml.core.errors import ConfigError
from efficientml.nas.costs import subnet_cost
from efficientml.nas.search import STRATEGIES, Constraints, SearchHistory
from efficientml.nas.space import Arch, MBSpace


def _quantile(xs: list[int], q: float) -> float:
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def subspace(space: MBSpace, width: float, resolution: int) -> MBSpace:
    return dataclasses.replace(space, widths=(width,), resolutions=(resolution,))


def space_statistics(space: MBSpace, sram_bytes: float, flash_bytes: float, samples: int = 1000,
                     seed: int = 0, peak_fn: Callable[[MBSpace, Arch], float] | None = None) -> list[dict]:
    """One row per (width, resolution): how many sampled networks fit and their MACs distribution."""
    rows = []
    for w in space.widths:
        for r in space.resolutions:
            sub, rng = subspace(space, w, r), random.Random(seed)
            fit = []
            for _ in range(samples):
                a = sub.sample(rng)
                c = subnet_cost(sub, a)
                peak = c.peak_bytes(8) if peak_fn is None else peak_fn(sub, a)
                if peak <= sram_bytes and c.params <= flash_bytes:  # int8: one byte per weight
                    fit.append(c.macs)
            row = {"width": w, "resolution": r, "samples": samples, "fit_fraction": len(fit) / samples,
                   "mean_macs_fitting": sum(fit) / len(fit) if fit else None}
            if fit:
                row["macs_quantiles"] = {str(q): _quantile(fit, q) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
            rows.append(row)
    return rows


def pick_space(rows: list[dict]) -> dict | None:
    """The row whose fitting networks have the largest mean MACs (None when nothing fits)."""
    ok = [r for r in rows if r["mean_macs_fitting"] is not None]
    return max(ok, key=lambda r: r["mean_macs_fitting"], default=None)


def tinynas(space: MBSpace, evaluate: Callable[[Arch], float], budget: int, sram_bytes: float,
            flash_bytes: float, *, strategy: str = "evolution", samples: int = 1000, seed: int = 0,
            max_macs: int | None = None, **search_kw) -> tuple[dict, SearchHistory]:
    """Space optimization then constrained search: (the space report with the pick, the history)."""
    rows = space_statistics(space, sram_bytes, flash_bytes, samples, seed)
    pick = pick_space(rows)
    if pick is None:
        raise ConfigError(f"no network of the space fits {sram_bytes:.0f} B of SRAM and {flash_bytes:.0f} B of "
                          f"Flash in {samples} samples per sub-space; loosen the budgets or widen the space")
    sub = subspace(space, pick["width"], pick["resolution"])
    cons = Constraints(max_macs=max_macs, max_params=int(flash_bytes), max_peak_bytes=sram_bytes)
    hist = STRATEGIES[strategy](sub, evaluate, budget, cons, seed=seed, **search_kw)
    return {"rows": rows, "pick": pick, "sram_bytes": sram_bytes, "flash_bytes": flash_bytes}, hist
