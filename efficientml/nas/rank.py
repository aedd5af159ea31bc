"""Rank correlation between two scorings of the same architectures (a proxy against accuracy).

``spearman`` is the Pearson correlation of average ranks (ties share the mean of their positions);
``kendall_tau`` is tau-b, (P − Q) / √((n₀ − n₁)(n₀ − n₂)) with P, Q the concordant and discordant
pairs, n₀ = n(n − 1)/2 and n₁, n₂ the pairs tied in a and in b. Both match scipy's ``spearmanr`` and
``kendalltau`` (its default tau-b) and return NaN where one side is constant. ±inf values (a naswot score
of a singular kernel) rank as the smallest or largest; NaN is rejected.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from efficientml.core.errors import ConfigError

Values = Sequence[float] | torch.Tensor


def _pair(a: Values, b: Values) -> tuple[torch.Tensor, torch.Tensor]:
    ta = torch.as_tensor(a, dtype=torch.float64).detach().cpu().flatten()
    tb = torch.as_tensor(b, dtype=torch.float64).detach().cpu().flatten()
    if ta.numel() != tb.numel():
        raise ConfigError(f"rank correlation needs two scorings of the same items, got {ta.numel()} and {tb.numel()}")
    if ta.numel() < 2:
        raise ConfigError(f"rank correlation needs at least 2 items, got {ta.numel()}")
    if bool(ta.isnan().any() or tb.isnan().any()):
        raise ConfigError("rank correlation got a NaN score; drop or replace the items that have none")
    return ta, tb


def average_ranks(v: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``v`` (n,), tied values sharing the mean of their positions (scipy's 'average')."""
    order = torch.argsort(v, stable=True)
    _, counts = torch.unique_consecutive(v[order], return_counts=True)
    ends = counts.cumsum(0)  # last 1-based position of each tie group
    ranks = torch.empty_like(v, dtype=torch.float64)
    ranks[order] = ((2 * ends - counts + 1).double() / 2).repeat_interleave(counts)  # (first + last) / 2
    return ranks


def spearman(a: Values, b: Values) -> float:
    """Spearman's ρ of two equally long scorings, average ranks for ties; NaN if either is constant."""
    ta, tb = _pair(a, b)
    ra = average_ranks(ta)
    rb = average_ranks(tb)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float(ra.pow(2).sum()) * float(rb.pow(2).sum()))
    return float((ra * rb).sum()) / den if den > 0 else math.nan


def _tied_pairs(v: torch.Tensor) -> int:
    _, counts = torch.unique(v, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def kendall_tau(a: Values, b: Values) -> float:
    """Kendall's tau-b of two equally long scorings, handling ties; NaN if either is constant.

    Exact integer pair counts, O(n²) work in row chunks of at most ~4M pairs (n = 10 000 takes seconds)."""
    ta, tb = _pair(a, b)
    ra, rb = average_ranks(ta), average_ranks(tb)  # finite and order-preserving, so ±inf compare cleanly
    n = ra.numel()
    step = max(1, (1 << 22) // n)
    twice_s = 0  # Σ_{i≠j} sign(a_i − a_j)·sign(b_i − b_j) = 2(P − Q)
    for s in range(0, n, step):
        da = torch.sign(ra[s : s + step, None] - ra[None, :])  # (chunk, n)
        db = torch.sign(rb[s : s + step, None] - rb[None, :])
        twice_s += int((da * db).sum())
    n0 = n * (n - 1) // 2
    den = math.sqrt(float(n0 - _tied_pairs(ra)) * float(n0 - _tied_pairs(rb)))
    return (twice_s / 2) / den if den > 0 else math.nan
