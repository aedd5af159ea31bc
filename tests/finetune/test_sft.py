"""SFT: loss only on response tokens, packing, exact gradient accumulation, gradient checkpointing
with the same gradients and fewer saved activations, and a short run that learns."""

import json

import pytest
import torch

from efficientml import apply
from efficientml.core.errors import ConfigError
from efficientml.finetune import LoRAConfig
from efficientml.finetune.sft import SFTConfig, gradient_checkpointing, token_loss, train_sft
from efficientml.finetune.sft_data import IGNORE, batches, encode_example, pack, pad, read_jsonl

from ..llm.conftest import tiny_model


class CharTok:
    """A character tokenizer with a chat template (ids 3…), EOS 2."""
    eos_id, bos_id = 2, None
    chat_template = "x"

    def encode(self, s, add_bos=None):
        return [3 + (ord(c) % 120) for c in s]

    def apply_chat_template(self, msgs, add_generation_prompt=True):
        s = "".join(f"<{m['role']}>{m['content']}" for m in msgs)
        return s + ("<assistant>" if add_generation_prompt else "")


def test_labels_cover_the_response_only():
    ids, labels = encode_example(CharTok(), {"prompt": "hi", "response": "yo"})
    prompt = len("<user>hi<assistant>")
    assert len(ids) == prompt + 2 + 1 and ids[-1] == 2
    assert labels[:prompt] == [IGNORE] * prompt and labels[prompt:] == ids[prompt:]
    ids2, labels2 = encode_example(CharTok(), {"text": "abc"})
    assert labels2 == ids2
    with pytest.raises(ConfigError, match="expected 'messages', 'prompt' \\+ 'response', or 'text'"):
        encode_example(CharTok(), {"question": "?"}, "example 1 of d.jsonl")


def test_pack_and_pad():
    enc = [([1, 2, 3], [IGNORE, 2, 3]), ([4, 5], [4, 5]), ([6, 7, 8, 9], [IGNORE] * 4)]
    ids, labels = pack(enc, 4)
    assert ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert labels.tolist() == [[IGNORE, 2, 3, 4], [5, IGNORE, IGNORE, IGNORE]]
    ids, labels = pad(enc, 3)
    assert ids.tolist() == [[1, 2, 3], [4, 5, 0], [6, 7, 8]] and labels[1].tolist() == [4, 5, IGNORE]


def test_read_jsonl_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n[1]\n')
    with pytest.raises(ConfigError, match="line 2 .* expected a JSON object"):
        read_jsonl(f)
    f.write_text('{"text": "a"}\n{bad\n')
    with pytest.raises(ConfigError, match="line 2 .* not valid JSON"):
        read_jsonl(f)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulation_and_checkpointing_give_the_same_gradients():
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:2, :5] = IGNORE  # unequal token counts per micro-batch: the normalization must be global
    model = apply(tiny_model(), LoRAConfig(rank=4, dropout=0.0)).model
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    loss, n = token_loss(model, ids, labels)
    (loss / n).backward()
    full = _grads(model)
    model.zero_grad()
    n_all = int((labels[:, 1:] != IGNORE).sum())
    for sl in (slice(0, 2), slice(2, 4)):
        with gradient_checkpointing(model):
            loss, _ = token_loss(model, ids[sl], labels[sl])
            (loss / n_all).backward()
    split = _grads(model)
    assert full.keys() == split.keys() and all(".lora_" in k for k in full)
    for k in full:
        torch.testing.assert_close(split[k], full[k], atol=1e-6, rtol=1e-5)
    assert all(type(b).__name__ == "DecoderLayer" for b in model.model.layers)  # blocks restored


def _saved_bytes(model, ids, ckpt):
    total = [0]

    def pack_hook(t):
        total[0] += t.numel() * t.element_size()
        return t

    with gradient_checkpointing(model, ckpt), torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        loss, _ = token_loss(model, ids, ids)
    return total[0]


def test_checkpointing_keeps_fewer_activations():
    model = apply(tiny_model(num_hidden_layers=4), LoRAConfig(rank=4)).model
    ids = torch.randint(0, 128, (4, 32))
    plain, ckpt = _saved_bytes(model, ids, False), _saved_bytes(model, ids, True)
    assert ckpt < 0.5 * plain  # block inputs only (plus the logits' own), not every intermediate


def test_a_short_run_learns_the_response(tmp_path):
    rows = [{"prompt": f"say {w}", "response": w * 3} for w in ("ab", "cd", "ef", "gh")] * 4
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    from efficientml.finetune.sft_data import encode_all

    ids, labels = pack(encode_all(CharTok(), read_jsonl(f)), 32)
    model = apply(tiny_model(), LoRAConfig(rank=8, alpha=16)).model
    cfg = SFTConfig(lr=5e-3, steps=30, batch_size=2, grad_accum=2, optimizer="adamw8bit", warmup_frac=0.1)
    hist = train_sft(model, batches(ids, labels, 2), cfg, progress=False)
    assert hist["curve"][-1]["loss"] < hist["curve"][0]["loss"] - 0.7  # measured: 5.04 → 3.98 nats
    assert hist["tokens"] == 30 * 2 * 2 * 32
