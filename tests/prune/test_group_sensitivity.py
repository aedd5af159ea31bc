"""Channel pruning of a trained depthwise network without fine-tuning (issue #16 item 7): a per-group
sensitivity report before committing, and the criterion that survives (ThiNet + least-squares refit)
where magnitude and BN-γ collapse."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.errors import ConfigError
from efficientml.data.digits import load_digits
from efficientml.models.mobilenetv2 import ConvBNReLU, InvertedResidual
from efficientml.prune import PruneConfig, prune
from efficientml.prune.sensitivity import choose_group_ratios, group_sensitivity


class DepthwiseNet(nn.Module):
    """Stem, three inverted residuals (1×1 expand, 3×3 depthwise, ReLU6, linear projection), head."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBNReLU(1, 16, 3)
        self.b1 = InvertedResidual(16, 16, 1, 4)
        self.b2 = InvertedResidual(16, 24, 2, 4)
        self.b3 = InvertedResidual(24, 24, 1, 4)
        self.head = ConvBNReLU(24, 64, 1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.head(self.b3(self.b2(self.b1(self.stem(x))))).mean((2, 3)))


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    xtr, ytr = load_digits("train", normalize=True)
    xte, yte = load_digits("test", normalize=True)
    model = DepthwiseNet()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(4):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    model.eval()
    calib = [(xtr[i:i + 128], ytr[i:i + 128]) for i in range(0, 512, 128)]
    return model, calib, xte, yte


def _acc(model, x, y):
    with torch.no_grad():
        return 100.0 * float((model.eval()(x).argmax(1) == y).float().mean())


def test_thinet_refit_survives_where_magnitude_collapses(trained):
    model, calib, xte, yte = trained
    dense = _acc(model, xte, yte)
    assert dense >= 95.0
    acc = {}
    for crit in ("l2", "bn_gamma", "thinet"):
        res = prune(model, PruneConfig(method="channel", sparsity=0.3, criterion=crit),
                    example_inputs=xte[:2], calib=calib)
        acc[crit] = _acc(res.model, xte, yte)
    assert acc["thinet"] >= dense - 8.0, acc                     # measured 93.0 (dense 97.5)
    assert acc["l2"] < 60.0 and acc["bn_gamma"] < 60.0, acc      # measured 16.2 and 13.1
    with torch.no_grad():                                        # taylor scores under no_grad too
        prune(model, PruneConfig(method="channel", sparsity=0.3, criterion="taylor"),
              example_inputs=xte[:2], calib=calib)


def test_group_report_matches_pruning_each_group_alone(trained):
    model, calib, xte, _ = trained
    rep = group_sensitivity(model, xte[:2], calib, ratios=(0.25, 0.5), criterion="l2")
    assert rep.metric == "accuracy"
    assert rep.baseline == pytest.approx(100.0 * sum(int((model(x).argmax(1) == y).sum()) for x, y in calib) / 512)
    assert {"b1.conv.2", "b1.conv.0.0", "b2.conv.0.0", "b3.conv.0.0", "head.0"} <= set(rep.groups)
    name = "b2.conv.0.0"                                          # b2's expand → depthwise channels
    g = rep.groups[name]
    assert g["prunable"] == g["channels"] == 64
    pruned = prune(model, PruneConfig(method="channel", sparsity=0.0, per_layer=((name, 0.5),)),
                   example_inputs=xte[:2]).model
    hits = sum(int((pruned(x).argmax(1) == y).sum()) for x, y in calib)
    assert g["metric"][1] == pytest.approx(100.0 * hits / 512)
    assert g["params_removed"][1] == sum(p.numel() for p in model.parameters()) - \
        sum(p.numel() for p in pruned.parameters())
    assert all(a >= b - 1e-9 for a, b in zip(g["sqnr_db"], g["sqnr_db"][1:]))   # more pruned, less faithful
    assert "| b2.conv.0.0 | 64/64 |" in rep.table()


def test_chosen_group_ratios_keep_accuracy(trained):
    model, calib, xte, yte = trained
    rep = group_sensitivity(model, xte[:2], calib, ratios=(0.25, 0.5), criterion="thinet")
    per_layer = choose_group_ratios(rep, max_drop=1.0)
    assert per_layer and all(r in (0.25, 0.5) for _, r in per_layer)
    for name, r in per_layer:
        i = rep.ratios.index(r)
        assert rep.baseline - rep.groups[name]["metric"][i] <= 1.0
    res = prune(model, PruneConfig(method="channel", sparsity=0.0, criterion="thinet", per_layer=per_layer),
                example_inputs=xte[:2], calib=calib)
    before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in res.model.parameters()) < before
    assert _acc(res.model, xte, yte) >= _acc(model, xte, yte) - 10.0


def test_report_errors(trained):
    model, calib, xte, _ = trained
    with pytest.raises(ConfigError, match="needs calibration batches"):
        group_sensitivity(model, xte[:2], [])
    with pytest.raises(ConfigError, match="no channel group is produced by layer 'nope'"):
        group_sensitivity(model, xte[:2], calib, groups=("nope",))
    with pytest.raises(ConfigError, match="ratio"):
        group_sensitivity(model, xte[:2], calib, ratios=(1.0,))
