"""DPO: the loss against a hand computation, the adapter-off reference against a frozen copy (bit for
bit), precomputed reference log-probabilities saved and reused, and a tiny model whose win rate under
the rule-based reward goes up after a few steps."""

import math

import pytest
import torch

from efficientml import apply
from efficientml.core.errors import ConfigError
from efficientml.finetune import LoRAConfig
from efficientml.finetune.dpo import DPOConfig, dpo_loss, train_dpo
from efficientml.finetune.preference import FormatRule, LengthRule, PreferenceSet, preference_pairs, win_rate
from efficientml.finetune.reference import ReferenceLogprobs, adapters_disabled, sequence_logprobs
from efficientml.finetune.sft_data import IGNORE

from ..llm.conftest import tiny_model


class WordTok:
    """Words hashed onto ids 3…122 (EOS 2), with a chat template: short rows, a fast tiny model."""
    eos_id, bos_id = 2, None
    chat_template = "x"

    def encode(self, s, add_bos=None):
        return [3 + sum(map(ord, w)) % 120 for w in s.replace("\n", " \n ").split(" ") if w]

    def apply_chat_template(self, msgs, add_generation_prompt=True):
        s = " ".join(f"<{m['role']}> {m['content']}" for m in msgs)
        return s + (" <assistant> " if add_generation_prompt else "")


RULE = FormatRule(prefix="Ay,", max_tokens=5)


def _lora_model(seed=0):
    return apply(tiny_model(seed, max_position_embeddings=128), LoRAConfig(rank=8, alpha=16)).model


def _prefs(n=16, seed=0, rule=RULE):
    return PreferenceSet.encode(WordTok(), preference_pairs(WordTok(), n_pairs=n, rule=rule, seed=seed))


def _randomize_b(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_dpo_loss_matches_hand_computation():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])
    rc, rr = torch.tensor([-3.5, -5.2]), torch.tensor([-3.8, -4.0])
    beta = 0.5
    h = [(-3.0 + 3.5) - (-4.0 + 3.8), (-5.0 + 5.2) - (-4.5 + 4.0)]  # 0.7, 0.7
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    want = sum(-math.log(sig(beta * x)) for x in h) / 2
    loss, stats = dpo_loss(pc, pr, rc, rr, beta)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert stats["reward_margin"] == pytest.approx(beta * 0.7, rel=1e-5) and stats["reward_accuracy"] == 1.0
    eps = 0.1
    want_ls = sum(-(1 - eps) * math.log(sig(beta * x)) - eps * math.log(sig(-beta * x)) for x in h) / 2
    assert dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps)[0].item() == pytest.approx(want_ls, rel=1e-6)
    want_ipo = sum((x - 1 / (2 * beta)) ** 2 for x in h) / 2
    assert dpo_loss(pc, pr, rc, rr, beta, "ipo")[0].item() == pytest.approx(want_ipo, rel=1e-6)
    with pytest.raises(ConfigError, match="label_smoothing applies to the sigmoid"):
        DPOConfig(loss="ipo", label_smoothing=0.1)


def test_sequence_logprobs_cover_response_tokens_only():
    model = tiny_model()
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :6] = IGNORE
    logp = torch.log_softmax(model(ids[:, :-1]), -1)
    want = sum(logp[:, t - 1].gather(-1, ids[:, t:t + 1]).squeeze(-1) for t in range(6, 10))
    torch.testing.assert_close(sequence_logprobs(model, ids, labels), want, rtol=1e-6, atol=1e-5)


def test_adapter_off_reference_equals_a_frozen_copy_exactly():
    frozen = tiny_model(max_position_embeddings=128)
    model = _lora_model()
    _randomize_b(model)
    prefs = _prefs(8)
    ids, labels = prefs.batch(torch.arange(8))
    with torch.no_grad():
        on = sequence_logprobs(model, ids, labels)
        with adapters_disabled(model) as ref:
            off = sequence_logprobs(ref, ids, labels)
        again = sequence_logprobs(model, ids, labels)
        want = sequence_logprobs(frozen, ids, labels)
    assert torch.equal(off, want)                    # bit for bit
    assert (on - off).abs().max() > 1e-3             # the adapter does change the policy
    assert torch.equal(on, again)                    # and is back after the block
    with pytest.raises(ConfigError, match="needs a model with LoRA adapters"):
        with adapters_disabled(frozen):
            pass


def test_precomputed_reference_saves_reloads_and_gives_the_same_training(tmp_path):
    prefs = _prefs(16)
    model = _lora_model()
    ref = ReferenceLogprobs.compute(model, prefs)
    ref.save(tmp_path / "ref.safetensors")
    back = ReferenceLogprobs.load(tmp_path / "ref.safetensors", prefs)
    assert torch.equal(back.logps, ref.logps)
    idx = torch.arange(4)
    ids, labels = prefs.batch(idx)
    with torch.no_grad():
        lp = sequence_logprobs(model, ids, labels)
        with adapters_disabled(model) as base:
            lr = sequence_logprobs(base, ids, labels)
    live = dpo_loss(lp[:4], lp[4:], lr[:4], lr[4:])[0]
    saved = dpo_loss(lp[:4], lp[4:], *back.select(idx))[0]
    torch.testing.assert_close(saved, live, rtol=1e-5, atol=1e-6)
    cfg = DPOConfig(steps=4, batch_size=4, lr=1e-2)
    calls = {"adapter": 0, "saved": 0, "precompute": 0}

    def counted(key):
        m = _lora_model()
        m.register_forward_hook(lambda *_: calls.__setitem__(key, calls[key] + 1))
        return m
    a = train_dpo(counted("adapter"), prefs, cfg, progress=False)
    b = train_dpo(counted("saved"), prefs, cfg, reference=back, progress=False)
    train_dpo(counted("precompute"), prefs, DPOConfig(steps=4, batch_size=4, lr=1e-2, reference="precomputed"),
              progress=False)
    assert b["reference"] == "precomputed"
    # forwards: policy + reference each step; saved log-probs: the policy only (the reference never
    # runs again, trl #3985); computed once up front: 16 pairs in 2 batches of 8, then the policy only
    assert calls == {"adapter": 8, "saved": 4, "precompute": 2 + 4}
    for x, y in zip(a["curve"], b["curve"]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-5)
    with pytest.raises(ConfigError, match="computed for other preference data"):
        ReferenceLogprobs.load(tmp_path / "ref.safetensors", _prefs(16, seed=5))


def test_dpo_raises_the_win_rate_of_a_tiny_model():
    tok = WordTok()
    prefs = _prefs(64)
    held = [p["prompt"] for p in preference_pairs(tok, n_pairs=32, rule=RULE, seed=1, part=(0.9, 1.0))]
    model = _lora_model()
    before = win_rate(model, tok, held, RULE)
    hist = train_dpo(model, prefs, DPOConfig(beta=0.1, steps=12, batch_size=8, lr=1e-2), progress=False)
    after = win_rate(model, tok, held, RULE)
    assert hist["curve"][-1]["loss"] < hist["curve"][0]["loss"]
    assert before["win_rate"] <= 0.1 and after["win_rate"] >= 0.8, (before, after)


def test_rules_and_pairs():
    tok = WordTok()
    rule = LengthRule(max_tokens=4)
    assert rule([5, 6, 2], tok) and not rule([2], tok) and not rule([5, 6, 7, 8, 2], tok) and not rule([5, 6], tok)
    for p in preference_pairs(tok, n_pairs=8, rule=rule):
        assert len(tok.encode(p["chosen"])) <= 3 < 2 * 4 < len(tok.encode(p["rejected"]))
        assert p["rejected"].startswith(p["chosen"])
    assert RULE(tok.encode("Ay, sir"), tok) and not RULE(tok.encode("No, sir"), tok)
    with pytest.raises(ConfigError, match="0 ≤ min_tokens < max_tokens"):
        LengthRule(max_tokens=2, min_tokens=2)
    with pytest.raises(ConfigError, match="lacks \\['rejected'\\]"):
        PreferenceSet.encode(tok, [{"prompt": "a", "chosen": "b"}])
