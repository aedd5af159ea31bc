import math

import pytest
import torch
import torch.nn as nn

from efficientml.analysis import measure_latency, num_threads
from efficientml.analysis.latency import summarize
from efficientml.core.errors import ConfigError


def test_num_threads_is_temporary():
    before = torch.get_num_threads()
    with num_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_summary_statistics_of_known_times():
    r = summarize([t / 1000 for t in range(1, 11)], warmup=3, threads=2, device="cpu")  # 1..10 ms
    assert r.median_ms == pytest.approx(5.5)
    assert r.mean_ms == pytest.approx(5.5)
    assert r.p10_ms == pytest.approx(1.9) and r.p90_ms == pytest.approx(9.1)
    assert r.iqr_ms == pytest.approx(7.75 - 3.25)
    assert r.std_ms == pytest.approx(math.sqrt(55 / 6))
    assert (r.min_ms, r.max_ms, r.runs, r.warmup, r.threads) == (pytest.approx(1), pytest.approx(10), 10, 3, 2)


def test_measure_latency_record_fields():
    calls = []

    class Counted(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            calls.append(torch.is_inference_mode_enabled())
            return self.lin(x)

    m = Counted().train()
    r = measure_latency(m, torch.randn(2, 8), warmup=3, runs=7, threads=1)
    assert len(calls) == 10 and all(calls)              # 3 dropped + 7 timed, inference mode
    assert (r.runs, r.warmup, r.threads, r.device) == (7, 3, 1, "cpu")
    assert 0 < r.min_ms <= r.p10_ms <= r.median_ms <= r.p90_ms <= r.max_ms
    assert r.iqr_ms >= 0 and r.std_ms >= 0
    assert m.training                                    # mode restored
    assert set(r.to_dict()) >= {"median_ms", "p10_ms", "p90_ms", "iqr_ms", "std_ms", "threads",
                                "device", "runs", "warmup"}


def test_measure_latency_kwargs_and_callable():
    r = measure_latency(lambda a, b: a + b, {"a": torch.ones(3), "b": torch.ones(3)}, warmup=0, runs=2)
    assert r.runs == 2 and r.device == "cpu"


def test_bad_arguments():
    with pytest.raises(ConfigError):
        measure_latency(nn.Identity(), torch.ones(1), runs=0)
    with pytest.raises(ConfigError):
        with num_threads(0):
            pass
