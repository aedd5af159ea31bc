"""Search strategies (budget, constraints, distinct evaluations), the latency table's bookkeeping and
the accuracy predictor on a known function."""

import json
import random

import pytest

from efficientml.core.errors import ConfigError
from efficientml.nas.costs import subnet_cost
from efficientml.nas.latency import LatencyTable, all_op_keys, op_keys
from efficientml.nas.predictor import AccuracyPredictor, error_vs_samples, rmse
from efficientml.nas.search import (Constraints, crossover, evolution_search, grid_search, mutate, pareto_front,
                                    random_search)
from efficientml.nas.space import MBSpace

SPACE = MBSpace()


def synthetic(a):
    """A deterministic score that prefers big kernels early and large expands late, with depth."""
    return sum(k * (i < 5) + e * (i >= 5) for i, (k, e) in enumerate(zip(a.kernels, a.expands))) + sum(a.depths)


def test_budget_constraints_and_distinct_evaluations():
    cap = subnet_cost(SPACE, SPACE.largest()).macs // 2
    for fn in (random_search, evolution_search, grid_search):
        calls = []
        hist = fn(SPACE, lambda a: calls.append(a) or synthetic(a), 30, Constraints(max_macs=cap))
        assert len(hist.records) == len(calls) <= 30 and len(set(calls)) == len(calls)
        assert all(r["costs"]["macs"] <= cap for r in hist.records)
        assert all(subnet_cost(SPACE, SPACE.canonical(a)).macs <= cap for a in calls)
    assert len(random_search(SPACE, synthetic, 30).records) == 30


def test_evolution_beats_random_on_average():
    cons = Constraints(max_peak_bytes=subnet_cost(SPACE, SPACE.largest()).peak_bytes() * 0.6)
    wins = 0
    for seed in range(5):
        r = random_search(SPACE, synthetic, 150, cons, seed=seed).best["score"]
        e = evolution_search(SPACE, synthetic, 150, cons, seed=seed).best["score"]
        wins += e >= r
    assert wins >= 4


def test_mutation_and_crossover_stay_in_the_space():
    rng = random.Random(0)
    a, b = SPACE.sample(rng), SPACE.sample(rng)
    for _ in range(50):
        SPACE.check(mutate(SPACE, a, rng, 0.3))
        c = crossover(SPACE, a, b, rng)
        SPACE.check(c)
        assert all(x in (y, z) for x, y, z in zip(c.depths, a.depths, b.depths))
    assert mutate(SPACE, a, rng, 0.0) == SPACE.canonical(a)


def test_impossible_constraints_and_latency_without_table():
    with pytest.raises(ConfigError, match="loosen"):
        random_search(SPACE, synthetic, 5, Constraints(max_macs=10))
    with pytest.raises(ConfigError, match="latency predictor"):
        random_search(SPACE, synthetic, 5, Constraints(max_latency_ms=1.0))


def test_history_json_pareto_and_plot(tmp_path):
    hist = random_search(SPACE, synthetic, 20, seed=1)
    hist.write(tmp_path / "h.json")
    d = json.loads((tmp_path / "h.json").read_text())
    assert d["evaluations"] == 20 and d["best"]["score"] == max(r["score"] for r in d["records"])
    assert (tmp_path / "h.png").stat().st_size > 1000
    front = pareto_front(hist.records)
    assert all(not any(o["costs"]["macs"] <= f["costs"]["macs"] and o["score"] > f["score"] for o in hist.records)
               for f in front)


def test_latency_table_sums_its_ops_and_round_trips(tmp_path):
    t = LatencyTable(SPACE, threads=1)
    keys = all_op_keys(SPACE)
    t.entries = {k: 0.001 * (i + 1) for i, k in enumerate(keys)}  # no measurement: the bookkeeping only
    a = SPACE.sample(random.Random(4))
    assert set(op_keys(SPACE, a)) <= set(keys)
    assert t.predict(a) == pytest.approx(sum(t.entries[k] for k in op_keys(SPACE, a)))
    assert len(op_keys(SPACE, a)) == 2 + sum(a.depths)
    t.save(tmp_path / "lut.json")
    t2 = LatencyTable.load(tmp_path / "lut.json")
    assert t2.entries == t.entries and t2.space == SPACE
    # every random subnet's ops are in the full table
    rng = random.Random(5)
    assert all(set(op_keys(SPACE, SPACE.sample(rng))) <= set(keys) for _ in range(200))


def test_accuracy_predictor_learns_an_additive_function():
    rng = random.Random(0)
    archs = list({SPACE.sample(rng) for _ in range(400)})
    acc = [70 + 0.5 * synthetic(a) / 10 for a in archs]
    p = AccuracyPredictor(SPACE).fit(archs[:300], acc[:300], epochs=400)
    assert rmse(p.predict(archs[300:]), acc[300:]) < 0.15
    curve = error_vs_samples(SPACE, archs[:300], acc[:300], archs[300:], acc[300:], [20, 300], epochs=300)
    assert curve[1]["rmse_points"] < curve[0]["rmse_points"]


def test_rl_controller_learns_and_respects_the_constraints():
    from efficientml.nas.rl import Controller, rl_search

    cap = subnet_cost(SPACE, SPACE.largest()).macs // 2
    hist = rl_search(SPACE, synthetic, 240, Constraints(max_macs=cap), seed=0, batch=8, lr=0.1)
    assert len(hist.records) == 240 and all(r["costs"]["macs"] <= cap for r in hist.records)
    scores = [r["score"] for r in hist.records]
    assert sum(scores[-40:]) / 40 > sum(scores[:40]) / 40 + 1.0      # the policy moved to better archs
    probs = hist.extra["controller"]["probabilities"]
    k_first = probs[2 + len(SPACE.stages)]                             # slot 0's kernel: 7 pays most
    assert k_first[SPACE.kernels.index(7)] > 1 / 3
    import math

    import torch

    ctrl = Controller(SPACE)  # uniform: log π(a) = −Σ log(choices), H = Σ log(choices)
    a, idx = ctrl.sample(torch.Generator().manual_seed(0))
    SPACE.check(a)
    hand = sum(math.log(len(c)) for c in ctrl.choices)
    with torch.no_grad():
        assert ctrl.decode(idx) == a and float(ctrl.log_prob(idx)) == pytest.approx(-hand)
        assert float(ctrl.entropy()) == pytest.approx(hand)


def _picklable_score(a):
    return synthetic(a)


def test_parallel_workers_give_the_same_history():
    one = random_search(SPACE, _picklable_score, 6, seed=2)
    two = random_search(SPACE, _picklable_score, 6, seed=2, workers=2)
    assert [r["key"] for r in one.records] == [r["key"] for r in two.records]
    assert [r["score"] for r in one.records] == [r["score"] for r in two.records]


def test_strategies_run_over_the_block_space_too():
    from efficientml.nas.cells import BlockSpace

    bs = BlockSpace(stages=((8, 1, 1), (16, 1, 2)), resolution=16)
    cap = 2_000_000

    def depth_score(a):
        return sum(a.depths) + 0.1 * len(set(a.blocks))

    for fn in (random_search, evolution_search):
        hist = fn(bs, depth_score, 8, Constraints(max_macs=cap), seed=1)
        assert len(hist.records) == 8 and all(r["costs"]["macs"] <= cap for r in hist.records)


def test_latency_calibration_recovers_a_linear_bias(tmp_path, monkeypatch):
    import efficientml.nas.latency as lat

    t = LatencyTable(SPACE, threads=1)
    t.entries = {k: 0.01 * (i % 7 + 1) for i, k in enumerate(all_op_keys(SPACE))}
    monkeypatch.setattr(lat, "_measure_net", lambda table, a, w, r: 1.25 * table.raw(a) + 0.3)
    rng = random.Random(9)
    fit = t.calibrate([SPACE.sample(rng) for _ in range(6)])
    assert fit["scale"] == pytest.approx(1.25) and fit["offset_ms"] == pytest.approx(0.3)
    a = SPACE.sample(rng)
    assert t.predict(a) == pytest.approx(1.25 * t.raw(a) + 0.3)
    assert lat.lut_error(t, [a])["mape"] == pytest.approx(0.0, abs=1e-12)
    t.save(tmp_path / "l.json")
    assert LatencyTable.load(tmp_path / "l.json").predict(a) == pytest.approx(t.predict(a))
