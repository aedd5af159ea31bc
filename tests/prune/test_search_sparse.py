import copy

import pytest
import torch
import torch.nn as nn

from efficientml.prune.amc import AMCConfig, amc_search
from efficientml.prune.sparse import CSRConv2d, CSRLinear, crossover, semi_structured_available, to_csr

from .conftest import calib


def test_csr_modules_match_dense():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, stride=2, padding=1)
    with torch.no_grad():
        conv.weight.mul_((torch.rand_like(conv.weight) > 0.8).float())
    x = torch.randn(2, 8, 9, 9)
    torch.testing.assert_close(CSRConv2d(conv)(x), conv(x), atol=1e-5, rtol=1e-5)
    lin = nn.Linear(16, 4)
    with torch.no_grad():
        lin.weight.mul_((torch.rand_like(lin.weight) > 0.7).float())
    xl = torch.randn(3, 16)
    torch.testing.assert_close(CSRLinear(lin)(xl), lin(xl), atol=1e-5, rtol=1e-5)


def test_to_csr_whole_model(vgg):
    from efficientml.prune import PruneConfig, prune

    m = prune(vgg, PruneConfig(method="fine", sparsity=0.9)).masks.remove()
    x = torch.randn(2, 1, 28, 28)
    sparse = to_csr(copy.deepcopy(m), min_sparsity=0.5)
    assert isinstance(sparse.backbone.conv3, CSRConv2d)
    torch.testing.assert_close(sparse(x), m(x), atol=1e-4, rtol=1e-4)


def test_crossover_reports_measured_rows():
    out = crossover(nn.Linear(64, 64), torch.randn(8, 64), sparsities=(0.5, 0.99), runs=2)
    assert [r["sparsity"] for r in out["rows"]] == [0.5, 0.99]
    assert all(r["kind"] == "measured" and r["dense_ms"] > 0 for r in out["rows"])


def test_semi_structured_gate_without_gpu():
    ok, why = semi_structured_available()
    if not torch.cuda.is_available():
        assert not ok and "CUDA" in why


@pytest.mark.cuda
def test_semi_structured_linear_matches_masked_dense():
    if not semi_structured_available()[0]:
        pytest.skip("no 2:4-capable GPU")
    from efficientml.prune.sparse import apply_24, to_semi_structured

    lin = nn.Linear(128, 128, bias=False).cuda().half()
    with torch.no_grad():
        lin.weight.copy_(apply_24(lin.weight))
    x = torch.randn(64, 128, device="cuda", dtype=torch.float16)
    ref = lin(x)
    torch.testing.assert_close(to_semi_structured(lin)(x), ref, atol=1e-2, rtol=1e-2)


def test_amc_meets_mac_budget(vgg):
    data = calib((1, 28, 28), n=1, bs=32)
    ref = vgg(data[0][0]).argmax(1)
    agree = lambda m: 100.0 * (m(data[0][0]).argmax(1) == ref).float().mean().item()  # noqa: E731
    res = amc_search(vgg, AMCConfig(mac_budget=0.5, episodes=4), torch.randn(1, 1, 28, 28), agree)
    from efficientml.analysis import count_macs

    dense = count_macs(vgg, (1, 1, 28, 28)).macs
    assert count_macs(res.model, (1, 1, 28, 28)).macs <= 0.5 * dense
    assert res.mac_fraction <= 0.5 and len(res.history) == 4


def test_netadapt_tiny_reduces_estimated_latency(vgg):
    from efficientml.prune.netadapt import NetAdaptConfig, netadapt

    data = calib((1, 28, 28), n=2, bs=16)
    cfg = NetAdaptConfig(target_ratio=0.7, initial_step=0.2, batch_size=4, grid=3, short_steps=1,
                         eval_batches=1, max_iterations=2, runs=2, lookup="macs")  # deterministic table
    res = netadapt(vgg, cfg, (1, 28, 28), data, data)
    assert len(res.iterations) == 2
    assert res.iterations[1]["measured_latency_ms"] < res.iterations[0]["measured_latency_ms"] < res.initial_latency_ms
    drop = res.initial_latency_ms - res.iterations[0]["measured_latency_ms"]
    assert drop >= 0.2 * res.initial_latency_ms * 0.999          # the first step met its requested drop
    it = res.iterations[0]
    assert {"group", "channels_before", "channels_after", "measured_latency_ms", "accuracy"} <= set(it)
    assert it["channels_after"] < it["channels_before"]
    assert sum(p.numel() for p in res.model.parameters()) < sum(p.numel() for p in vgg.parameters())
