import pytest
import torch
import torch.nn as nn

from efficientml.core.errors import ConfigError
from efficientml.prune import PruneConfig
from efficientml.prune.schedule import AGPPruner, agp_sparsity, iterative_sparsities
from efficientml.prune.sensitivity import (SensitivityScan, allocate_by_params, choose_sparsities,
                                           plot_sensitivity, sensitivity_scan)


def test_iterative_and_agp_values():
    assert iterative_sparsities(0.7) == [0.3, 0.5, 0.7]
    assert agp_sparsity(0, 0.8, 100) == 0.0
    assert agp_sparsity(100, 0.8, 100) == pytest.approx(0.8)
    assert agp_sparsity(50, 0.8, 100) == pytest.approx(0.8 * (1 - 0.5 ** 3))  # cubic: 0.7 at half-time
    assert agp_sparsity(500, 0.8, 100) == pytest.approx(0.8)


def test_agp_pruner_reaches_final_sparsity_during_training(mlp):
    agp = AGPPruner(mlp, PruneConfig(method="fine", sparsity=0.8), total_steps=20, frequency=5)
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
    for _ in range(25):
        opt.zero_grad()
        nn.functional.cross_entropy(mlp(x), y).backward()
        opt.step()
        agp(mlp)
    zeros = sum(int((mlp.get_submodule(n).weight == 0).sum()) for n in ("fc1", "fc2", "fc3"))
    total = sum(mlp.get_submodule(n).weight.numel() for n in ("fc1", "fc2", "fc3"))
    assert zeros >= round(0.8 * 20 * 32) + round(0.8 * 32 * 24) + round(0.8 * 24 * 5)
    assert zeros / total == pytest.approx(0.8, abs=0.01)
    assert [s for _, s in agp.history] == sorted(s for _, s in agp.history)  # monotone


def test_sensitivity_scan_choose_and_allocate(mlp, tmp_path):
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    ref = mlp(x).argmax(1)
    agree = lambda m: 100.0 * (m(x).argmax(1) == ref).float().mean().item()  # noqa: E731
    scan = sensitivity_scan(mlp, agree, sparsities=(0.25, 0.5, 0.9))
    assert scan.dense_accuracy == 100.0 and set(scan.accuracy) == {"fc1", "fc2", "fc3"}
    assert (mlp(x).argmax(1) == ref).all()                        # weights restored
    chosen = choose_sparsities(scan, max_drop=5.0)
    for n, s in chosen.items():
        accs = dict(zip(scan.sparsities, scan.accuracy[n]))
        assert s == 0.0 or 100.0 - accs[s] <= 5.0
    alloc = allocate_by_params(scan, target=0.5)
    removed = sum(alloc[n] * scan.params[n] for n in alloc)
    assert removed >= 0.5 * sum(scan.params.values())
    png = plot_sensitivity(scan, str(tmp_path / "s.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_allocate_prefers_insensitive_big_layers():
    scan = SensitivityScan(90.0, [0.5, 0.9], {"big": [90.0, 89.5], "small": [80.0, 50.0]},
                           {"big": 1000, "small": 100})
    alloc = allocate_by_params(scan, target=0.8)
    assert alloc["big"] == 0.9 and alloc["small"] < 0.9
    with pytest.raises(ConfigError, match="max_drop"):
        choose_sparsities(scan, -1)
