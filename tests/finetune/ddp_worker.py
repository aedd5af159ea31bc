"""Run by tests/finetune/test_ddp.py, under ``torchrun --nproc_per_node N`` or alone: LoRA SFT and LoRA
DPO on a tiny model, the loss curves written as JSON by rank 0 to the path in argv[1]."""

import json
import sys

import torch

from efficientml import apply
from efficientml.finetune import LoRAConfig, adapter_state_dict
from efficientml.finetune.dpo import DPOConfig, train_dpo
from efficientml.finetune.preference import FormatRule, PreferenceSet, preference_pairs
from efficientml.finetune.sft import SFTConfig, train_sft
from efficientml.finetune.sft_data import IGNORE, batches
from efficientml.llm.config import LlamaConfig
from efficientml.llm.model import build_model
from efficientml.train.distributed import init_distributed


class WordTok:
    eos_id, bos_id, chat_template = 2, None, "x"

    def encode(self, s, add_bos=None):
        return [3 + sum(map(ord, w)) % 120 for w in s.split() if w]

    def apply_chat_template(self, msgs, add_generation_prompt=True):
        s = " ".join(f"<{m['role']}> {m['content']}" for m in msgs)
        return s + (" <assistant> " if add_generation_prompt else "")


def _tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return apply(build_model(cfg, "cpu"), LoRAConfig(rank=4, alpha=8)).model


def main(out: str) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed()
    model = _tiny()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (16, 16), generator=g)
    labels = ids.clone()
    labels[::3, :7] = IGNORE  # unequal labelled-token counts per shard: the normalization must be global
    sft = SFTConfig(lr=5e-3, steps=5, batch_size=4, grad_accum=2, warmup_frac=0.0)
    hist = train_sft(model, batches(ids, labels, 4, seed=0), sft, progress=False, dist=ctx)
    tok = WordTok()
    prefs = PreferenceSet.encode(tok, preference_pairs(tok, n_pairs=16, rule=FormatRule("Ay,", 5)))
    dpo = train_dpo(_tiny(), prefs, DPOConfig(steps=4, batch_size=4, lr=1e-2), progress=False, dist=ctx)
    if ctx is None or ctx.main:
        norm = sum(float(v.double().norm()) for v in adapter_state_dict(model).values())
        with open(out, "w") as f:
            json.dump({"curve": [r["loss"] for r in hist["curve"]], "world": hist["world_size"],
                       "adapter_norm": norm, "dpo": [r["loss"] for r in dpo["curve"]],
                       "dpo_margin": [r["reward_margin"] for r in dpo["curve"]]}, f)

    if ctx is not None:
        ctx.close()

if __name__ == "__main__":
    main(sys.argv[1])
