"""NetAdapt's loop on deterministic (theoretical) latencies: no timing asserts."""

import pytest
import torch

from efficientml.core.errors import ConfigError
from efficientml.prune import netadapt as na
from .conftest import calib

SAMPLE = (1, 28, 28)


def macs_ms(model, bs=4):
    from efficientml.analysis import count_macs

    return count_macs(model, (1, *SAMPLE)).macs * bs / 1e6


def run(vgg, **kw):
    data = calib(SAMPLE, n=2, bs=16)
    cfg = na.NetAdaptConfig(**{"target_ratio": 0.5, "initial_step": 0.15, "step_decay": 0.9, "batch_size": 4,
                               "grid": 3, "short_steps": 1, "eval_batches": 1, "max_iterations": 20,
                               "runs": 1, "lookup": "macs", **kw})
    return na.netadapt(vgg, cfg, SAMPLE, data, data), cfg


def test_reaches_goal_and_records_each_iteration(vgg):
    res, cfg = run(vgg)
    l0 = res.initial_latency_ms
    assert l0 == pytest.approx(macs_ms(vgg))
    assert res.final_latency_ms <= 0.5 * l0 and res.latency_reduction >= 2.0
    assert res.final_latency_ms == pytest.approx(macs_ms(res.model))   # the kept model, re-measured
    lat = [l0] + [it["measured_latency_ms"] for it in res.iterations]
    assert all(b < a for a, b in zip(lat, lat[1:]))
    assert lat[-2] > 0.5 * l0                                      # stopped at the first iteration at goal
    for i, it in enumerate(res.iterations):
        step = cfg.initial_step * l0 * cfg.step_decay ** i
        assert it["requested_drop_ms"] == pytest.approx(min(step, lat[i] - 0.5 * l0))
        assert lat[i] - lat[i + 1] >= it["requested_drop_ms"] * 0.999   # each step met its request
        assert it["channels_after"] < it["channels_before"]
        assert {"group", "accuracy", "measured_latency_ms", "tries"} <= set(it)


def test_margin_moves_the_goal(vgg):
    res, _ = run(vgg, margin=0.2, max_iterations=30)
    assert res.final_latency_ms <= 0.5 * 0.8 * res.initial_latency_ms


def test_measured_latency_decides_when_the_table_overestimates(vgg, monkeypatch):
    # the "measured" latency has a fixed part the table does not see (BatchNorm, ReLU, pooling):
    # the table's share overestimates each drop, and channels must be added until the measurement agrees
    rest = macs_ms(vgg)
    monkeypatch.setattr(na._Meter, "one", lambda self, m: rest + macs_ms(m))
    res, _ = run(vgg, target_ratio=0.7, probes=6)
    l0 = res.initial_latency_ms
    assert l0 == pytest.approx(2 * rest)
    assert res.final_latency_ms <= 0.7 * l0
    assert any(len(it["tries"]) > 1 for it in res.iterations)
    for it in res.iterations:
        assert it["tries"][-1]["measured_drop_fraction"] == it["measured_drop_fraction"]
        assert it["measured_drop_fraction"] < it["estimated_drop_fraction"]   # the table alone would undershoot


def test_more_channels_grows_with_the_shortfall():
    allowed = na._removable(64, 64, 1)
    assert allowed == list(range(1, 64))
    assert na._more_channels(4, 0.05, 0.1, allowed) == 8          # half the drop: twice the channels
    assert na._more_channels(10, 0.08, 0.1, allowed) == 13        # proportional
    assert na._more_channels(10, 0.0999, 0.1, allowed) == 11      # at least one more
    assert na._more_channels(10, 0.0, 0.1, allowed) == 20         # nothing measured: at most twice
    assert na._more_channels(40, 0.01, 0.1, allowed) == 63        # never all channels
    assert na._more_channels(63, 0.01, 0.1, allowed) is None


def test_kept_channels_are_multiples():
    allowed = na._removable(64, 64, 8)
    assert [64 - k for k in allowed] == [56, 48, 40, 32, 24, 16, 8, 7, 6, 5, 4, 3, 2, 1]
    assert na._more_channels(8, 0.05, 0.07, allowed) == 16        # 12 wanted → next kept multiple
    assert na._removable(10, 8, 4) == [2, 6, 7]                   # two frozen: fewer than the 8 free ones removed


def test_channels_needed_is_the_fewest_meeting_the_share(vgg):
    from efficientml.prune.graph import DependencyGraph

    graph = DependencyGraph.build(vgg, torch.randn(2, *SAMPLE))
    table = na.LatencyTable(vgg, graph, 4, 1, 3, 1, measured=False)
    counts = na._counts(vgg, table.table)
    g = next(g for g in graph.groups if g.name.endswith("bn3"))
    allowed = na._removable(len(g), len(g), 1)
    k = na._channels_needed(g, counts, table, 0.05, allowed)
    assert k is not None and na._estimated_drop(g, counts, table, k) >= 0.05
    assert na._estimated_drop(g, counts, table, k - 1) < 0.05
    assert na._channels_needed(g, counts, table, 0.99, allowed) is None   # no group saves 99%


def test_multiple_of_eight_keeps_aligned_counts():
    from efficientml.models import build_model

    torch.manual_seed(0)
    model = build_model("vgg", width=0.25, in_channels=1).eval()     # 16…32 channels
    res, _ = run(model, channel_multiple=8, target_ratio=0.6)
    assert res.final_latency_ms <= 0.6 * res.initial_latency_ms
    for it in res.iterations:
        kept = it["channels_after"]
        assert kept % 8 == 0 or kept < 8


@pytest.mark.parametrize("kw", [{"statistic": "mean"}, {"margin": 1.0}, {"probes": -1}, {"rounds": 0}])
def test_bad_config(kw):
    with pytest.raises(ConfigError):
        na.NetAdaptConfig(**kw)


def test_pair_ignores_one_disturbed_round(monkeypatch):
    # rounds of (a, b) timings; the second round was slowed by another job while b ran
    times = iter([10.0, 5.0, 10.5, 50.0, 11.0, 5.6])
    monkeypatch.setattr(na._Meter, "one", lambda self, m: next(times))
    meter = na._Meter(na.NetAdaptConfig(rounds=3), SAMPLE)
    ta, tb = meter.pair(None, None)
    assert ta == 10.0                                    # a's best round
    assert tb == pytest.approx(10.0 * 5.6 / 11.0)        # median of b/a over rounds: 0.5, 4.76, 0.509
