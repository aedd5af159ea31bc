import pytest
import torch

from efficientml.prune import PruneConfig, prune


@pytest.fixture(scope="module")
def r56_and_x(pretrained_cifar):
    model, x, _ = pretrained_cifar("resnet56")
    return model, x[:8]


def test_ratio0_identical(r56_and_x):
    model, x = r56_and_x
    pruned = prune(model, PruneConfig(method="channel", sparsity=0.0), example_inputs=x[:2]).model
    with torch.no_grad():
        assert (pruned(x) - model(x)).abs().max().item() == 0.0


def test_ratio05_counts_match_analysis(r56_and_x):
    from efficientml.analysis import count_macs, count_parameters

    model, x = r56_and_x
    res = prune(model, PruneConfig(method="channel", sparsity=0.5), example_inputs=x[:1])
    with torch.no_grad():
        out = res.model(x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    assert count_parameters(res.model) == res.plan.predicted_params(model)
    assert count_macs(res.model, (1, 3, 32, 32)).macs == res.plan.predicted_macs()
    assert count_parameters(res.model) < 0.35 * count_parameters(model)
