import math

import pytest
import torch
import torch.nn as nn

from efficientml.analysis import (accuracy, compare_models, compare_outputs, mean_nll, perplexity,
                                  sqnr, top1_agreement)
from efficientml.core.errors import ShapeError


def test_sqnr_identical_is_inf():
    x = torch.randn(100)
    assert sqnr(x, x.clone()) == math.inf


def test_sqnr_known_noise():
    ref = torch.tensor([1.0, -1.0] * 50)
    noise = torch.tensor([0.1, 0.1, -0.1, -0.1] * 25)
    assert sqnr(ref, ref + noise) == pytest.approx(20.0)          # power ratio 100
    assert sqnr(ref, ref + 0.5 * ref) == pytest.approx(10 * math.log10(4))
    with pytest.raises(ShapeError):
        sqnr(ref, ref[:10])


def test_accuracy_and_agreement():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.3, 0.4, 0.35]])
    targets = torch.tensor([1, 0, 0, 2])
    assert accuracy(logits, targets) == 0.5
    assert accuracy(logits, targets, topk=2) == 0.75
    other = logits.clone()
    other[0] = torch.tensor([1.0, 0.0, 0.0])
    assert top1_agreement(logits, other) == 0.75


def test_perplexity_from_mean_nll():
    v = 50
    logits = torch.zeros(4, 7, v)               # uniform over 50 tokens: NLL = log 50
    targets = torch.randint(0, v, (4, 7))
    nll = mean_nll(logits, targets)
    assert nll == pytest.approx(math.log(v))
    assert perplexity(nll) == pytest.approx(v)
    assert perplexity(0.0) == 1.0


def test_compare_models():
    torch.manual_seed(0)
    a = nn.Linear(8, 4)
    b = nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(16, 8)
    same = compare_models(a, b, x)
    assert same.sqnr_db == math.inf and same.top1_agreement == 1.0 and same.max_abs_diff == 0.0
    with torch.no_grad():
        b.bias.add_(0.01)
    diff = compare_models(a, b, x)
    assert diff.max_abs_diff == pytest.approx(0.01, abs=1e-6)
    out = a(x).detach()
    assert diff.sqnr_db == pytest.approx(10 * math.log10(out.pow(2).sum().item() / (out.numel() * 1e-4)),
                                         rel=1e-3)
    assert compare_outputs(out, out).to_dict()["sqnr_db"] == math.inf
