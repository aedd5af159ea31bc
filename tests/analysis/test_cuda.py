import pytest
import torch

from efficientml.analysis import measure_latency, profile


@pytest.mark.cuda
def test_profile_and_latency_on_gpu(zoo):
    import copy

    model = copy.deepcopy(zoo("resnet20")).cuda()
    p = profile(model, (1, 3, 32, 32))
    assert (p.params, p.macs) == (269_722, 40_551_040)
    assert p.peak_activation_elements == 3 * 16 * 32 * 32
    r = measure_latency(model, torch.randn(8, 3, 32, 32, device="cuda"), warmup=3, runs=5)
    assert r.device.startswith("cuda") and r.runs == 5 and r.median_ms > 0
