"""Per-group channel-pruning sensitivity (prune.sensitivity.group_sensitivity): each group pruned alone."""

import pytest
import torch
from torch import nn

from efficientml.core.errors import ConfigError
from efficientml.prune.sensitivity import choose_group_ratios, group_sensitivity


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),  # depthwise
        nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)).eval()


@pytest.mark.parametrize("criterion", ["l2", "thinet"])
def test_group_report_and_choice(criterion):
    m = _net()
    x = torch.randn(2, 3, 16, 16)
    calib = [(torch.randn(8, 3, 16, 16), None) for _ in range(2)]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rep = group_sensitivity(m, x, calib, ratios=(0.25, 0.5), criterion=criterion)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())   # the model is untouched
    assert rep.metric == "agreement" and rep.baseline == 100.0 and len(rep.groups) == 2
    for g in rep.groups.values():
        assert len(g["metric"]) == len(g["sqnr_db"]) == 2
        assert 0 < g["params_removed"][0] < g["params_removed"][1]            # more channels, fewer weights
        assert all(0.0 <= a <= 100.0 for a in g["metric"])
    assert "| group | channels | 0.25 | 0.5 |" in rep.table()
    assert {n for n, _ in choose_group_ratios(rep, max_drop=100.0)} == set(rep.groups)
    assert all(r == 0.5 for _, r in choose_group_ratios(rep, max_drop=100.0))
    with pytest.raises(ConfigError, match="no channel group is produced by layer 'nope'"):
        group_sensitivity(m, x, calib, groups=("nope",))
    with pytest.raises(ConfigError, match="needs calibration batches"):
        group_sensitivity(m, x, [])
