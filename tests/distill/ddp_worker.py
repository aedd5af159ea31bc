"""Run by tests/distill/test_llm_ddp.py, under ``torchrun --nproc_per_node N`` or alone: a pruned tiny LLaMA
distilled from the full one; rank 0 writes the loss curve and the student's weight norm to argv[1]."""

import copy
import json
import sys

import torch

from efficientml.distill.llm import IGNORE, LLMDistillConfig, distill_llm, drop_layers
from efficientml.finetune.sft_data import batches
from efficientml.llm.config import LlamaConfig
from efficientml.llm.model import build_model
from efficientml.train.distributed import init_distributed


def main(out: str) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    teacher = build_model(cfg, "cpu").eval()
    student = drop_layers(copy.deepcopy(teacher), [1])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (16, 16), generator=g)
    labels = ids.clone()
    labels[::3, :7] = IGNORE  # unequal counts per shard: the normalisation must be global
    res = distill_llm(student, teacher, batches(ids, labels, 4, seed=0),
                      LLMDistillConfig(steps=5, lr=5e-3, alpha=0.7, temperature=2.0, warmup_frac=0.0), dist=ctx)
    if ctx is None or ctx.main:
        norm = sum(float(p.double().norm()) for p in student.parameters())
        with open(out, "w") as f:
            json.dump({"curve": [r["loss"] for r in res["curve"]], "kd": [r["kd"] for r in res["curve"]],
                       "world": res["world_size"], "norm": norm}, f)

    if ctx is not None:
        ctx.close()

if __name__ == "__main__":
    main(sys.argv[1])
