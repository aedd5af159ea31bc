"""TinyNAS: sub-space statistics against brute force, the pick, and the constrained search in it."""

import random

import pytest

from efficientml.core.errors import ConfigError
from efficientml.nas.costs import subnet_cost
from efficientml.nas.space import MBSpace
from efficientml.nas.tinynas import pick_space, space_statistics, subspace, tinynas

META = MBSpace(widths=(0.5, 0.75, 1.0), resolutions=(16, 20, 24, 28))


def test_statistics_match_a_direct_count():
    sram, flash = 40_000, 300_000
    rows = space_statistics(META, sram, flash, samples=60, seed=3)
    assert len(rows) == 12
    for row in rows:
        sub, rng = subspace(META, row["width"], row["resolution"]), random.Random(3)
        costs = [subnet_cost(sub, sub.sample(rng)) for _ in range(60)]
        fit = [c.macs for c in costs if c.peak_elements <= sram and c.params <= flash]
        assert row["fit_fraction"] == len(fit) / 60
        assert row["mean_macs_fitting"] == (sum(fit) / len(fit) if fit else None)
    pick = pick_space(rows)
    assert pick["mean_macs_fitting"] == max(r["mean_macs_fitting"] for r in rows if r["mean_macs_fitting"])


def test_tight_memory_prefers_lower_resolution_or_width():
    rows = space_statistics(META, 25_000, 10**7, samples=40)
    loose = space_statistics(META, 10**9, 10**9, samples=40)
    assert pick_space(loose)["width"] == 1.0 and pick_space(loose)["resolution"] == 28
    tight = pick_space(rows)
    assert (tight["width"], tight["resolution"]) != (1.0, 28)


def test_search_in_the_picked_space_respects_the_budgets():
    report, hist = tinynas(META, lambda a: subnet_cost(META, a).macs, 20, 30_000, 200_000, samples=40)
    assert report["pick"] in report["rows"]
    assert all(r["costs"]["peak_bytes_int8"] <= 30_000 and r["costs"]["params"] <= 200_000 for r in hist.records)
    assert {r["arch"]["resolution"] for r in hist.records} == {report["pick"]["resolution"]}
    with pytest.raises(ConfigError, match="fits"):
        tinynas(META, lambda a: 0.0, 5, 10, 10, samples=5)
