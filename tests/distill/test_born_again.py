"""Born-again networks: generations, each distilled from the one before (frozen), the ensemble's mean."""

import copy
import importlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.errors import ConfigError
from efficientml.distill import DistillConfig, Ensemble, born_again
from efficientml.train import TrainConfig, evaluate

ba = importlib.import_module("efficientml.distill.born_again")  # the package's `born_again` is the function
CFG = TrainConfig(epochs=3, lr=0.1, schedule="constant", warmup_frac=0.0)


def _make(g):
    torch.manual_seed(100 + g)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


def _data(n=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


def test_ensemble_is_the_mean_of_the_members_softmax():
    members = [_make(g) for g in range(3)]
    x = torch.randn(5, 6)
    mean = torch.stack([F.softmax(m(x), -1) for m in members]).mean(0)
    ens = Ensemble(members)
    torch.testing.assert_close(ens.probs(x), mean)
    torch.testing.assert_close(ens(x), mean.log())                    # forward: log-probabilities
    y = torch.tensor([0, 1, 2, 0, 1])
    nll = -mean.log().gather(1, y[:, None]).mean().item()
    assert math.isclose(evaluate(ens, [(x, y)])["loss"], nll, rel_tol=1e-5)


def _recording(monkeypatch):
    calls = []
    real = ba.distill

    def spy(student, teacher, loader, config, train, **kw):
        before = copy.deepcopy(teacher.state_dict())
        h = real(student, teacher, loader, config, train, **kw)
        calls.append(dict(student=student, teacher=teacher, frozen=all(not p.requires_grad for p in
                                                                        teacher.parameters()),
                          teacher_eval=not teacher.training, unchanged=all(torch.equal(v, before[k]) for k, v in
                                                                            teacher.state_dict().items())))
        return h

    monkeypatch.setattr(ba, "distill", spy)
    return calls


def test_each_generation_is_distilled_from_the_previous_one(monkeypatch):
    calls = _recording(monkeypatch)
    test = _data(48, 1)
    r = born_again(_make, None, _data(), CFG, generations=2, eval_loader=test, progress=False)
    models = r["models"]
    assert len(models) == 3 and len(r["histories"]) == 3 and r["members"] == [0, 1, 2]
    assert all(h["steps"] == 9 for h in r["histories"])
    assert len(calls) == 2
    for g, c in enumerate(calls, start=1):
        assert c["student"] is models[g] and c["teacher"] is models[g - 1]
        assert c["frozen"] and c["teacher_eval"] and c["unchanged"]
    assert all(p.requires_grad for m in models for p in m.parameters())  # flags restored afterwards
    assert "loss_kd" in r["histories"][1]["epochs"][0]
    assert r["eval_accuracy"] == [evaluate(m, test)["accuracy"] for m in models]
    x = test[0][0]
    mean = torch.stack([F.softmax(m(x), -1) for m in models]).mean(0)
    torch.testing.assert_close(r["ensemble"].probs(x), mean)
    assert r["ensemble_accuracy"] == evaluate(Ensemble(models), test)["accuracy"]


def test_a_given_first_teacher_teaches_but_is_not_a_member(monkeypatch):
    calls = _recording(monkeypatch)
    teacher = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    t_state = copy.deepcopy(teacher.state_dict())
    r = born_again(_make, teacher, _data(), CFG, generations=1,
                   config=DistillConfig(method="kd", alpha=0.5, temperature=2.0), progress=False)
    assert r["models"][0] is teacher and r["histories"][0] is None and r["members"] == [1]
    assert calls[0]["teacher"] is teacher and calls[0]["student"] is r["models"][1]
    assert all(torch.equal(v, t_state[k]) for k, v in teacher.state_dict().items())


def test_generations_must_be_fresh_and_positive():
    with pytest.raises(ConfigError, match="positive integer"):
        born_again(_make, None, _data(), CFG, generations=0, progress=False)
    same = _make(0)
    with pytest.raises(ConfigError, match="fresh model"):
        born_again(lambda g: same, None, _data(), CFG, generations=1, progress=False)
