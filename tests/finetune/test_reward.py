"""The Bradley–Terry reward model: the loss against a hand computation, the reward read at each row's
last real token, and held-out pair accuracy well above chance on a tiny model."""

import math

import pytest
import torch

from efficientml import apply
from efficientml.core.errors import ConfigError
from efficientml.finetune import LoRAConfig
from efficientml.finetune.preference import LengthRule, PreferenceSet, preference_pairs
from efficientml.finetune.reward import (RewardConfig, RewardModel, bradley_terry_loss, last_index,
                                         reward_accuracy, train_reward)
from efficientml.finetune.sft_data import IGNORE

from ..llm.conftest import tiny_model
from .test_dpo import RULE, WordTok


def test_bradley_terry_loss_and_last_index():
    rc, rr = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    want = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(1.0)))) / 2
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(want, rel=1e-6)
    labels = torch.tensor([[IGNORE, 5, 6, IGNORE], [IGNORE, IGNORE, 7, 8]])
    assert last_index(labels).tolist() == [2, 3]


def test_reward_reads_the_last_real_token_whatever_the_padding():
    lm = tiny_model(max_position_embeddings=128)
    rm = RewardModel(lm)
    torch.nn.init.normal_(rm.score.weight, std=0.1)
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([ids, torch.full((1, 3), 2)], 1)
    torch.testing.assert_close(rm(padded, torch.tensor([5])), rm(ids, torch.tensor([5])), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="needs an efficientml causal LM"):
        RewardModel(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("rule", [RULE, LengthRule(max_tokens=5)], ids=["format", "length"])
def test_reward_model_ranks_held_out_pairs(rule):
    tok = WordTok()
    train = PreferenceSet.encode(tok, preference_pairs(tok, n_pairs=64, rule=rule, seed=0))
    held = PreferenceSet.encode(tok, preference_pairs(tok, n_pairs=48, rule=rule, seed=1, part=(0.9, 1.0)))
    rm = RewardModel(apply(tiny_model(max_position_embeddings=128), LoRAConfig(rank=8, alpha=16)).model)
    before = reward_accuracy(rm, held)
    hist = train_reward(rm, train, RewardConfig(steps=20, lr=1e-2), progress=False)
    after = reward_accuracy(rm, held)
    assert before["accuracy"] == 0.0  # zero head: every pair tied, none ranked right
    assert hist["curve"][-1]["loss"] < math.log(2)
    assert after["accuracy"] >= 0.8, after
