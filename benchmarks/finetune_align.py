"""Parts of benchmarks/finetune.py for issue #19's alignment and deployment targets (run through it:
``python benchmarks/finetune.py --parts merge_w4,bitdelta,dpo,ddp``). Full mode: SmolLM2-135M on
TinyShakespeare (train on the first 90%, held-out perplexity on the rest). ``--quick``: the same code on
a tiny random LLaMA with SmolLM2's tokenizer, to check that it runs (its numbers mean nothing).

- ``merge_w4``: LoRA r=16 trained by SFT on a W4 base (symmetric, groups of 32 = GGUF Q4_0), merged onto
  the base's own grid with GPTQ (scales fixed) vs rounding with them; and QLoRA (NF4 base) merged into
  W4 g32 with GPTQ vs round-to-nearest. Held-out perplexity of each ÷ its base+adapter model's; the
  merged models saved as a packed checkpoint and as GGUF (sizes recorded).
- ``bitdelta``: full fine-tuning, the delta compressed to signs + one scale per matrix, scales distilled
  against the fine-tune's logits on calibration rows; size ratio vs an fp16 delta, perplexity ÷ the
  fine-tune's (before and after distillation).
- ``dpo``: LoRA + DPO on rule-based pairs (a response wins when it ends within N tokens), reference
  log-probabilities precomputed once; win rate on held-out prompts (greedy), held-out TinyShakespeare
  perplexity after ÷ before (the drift).
- ``ddp``: LoRA SFT under ``torchrun --nproc_per_node 2`` (gloo) vs one process, same global batch:
  the loss curves' largest difference.

    python benchmarks/finetune_align.py OUT.json     # the DDP child (launched by the ddp part)
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from efficientml.analysis.record import log
from efficientml.finetune import LoRAConfig, QLoRAConfig
from efficientml.finetune.recipe import corpus_rows, held_out_loss, prepare
from efficientml.finetune.sft import SFTConfig, train_sft
from efficientml.finetune.sft_data import batches

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def budget(quick: bool) -> dict:
    if quick:
        return {"steps": 3, "batch": 2, "length": 32, "eval_rows": 2, "max_chars": 20000, "calib": 4,
                "distill_steps": 3, "dpo_pairs": 16, "dpo_held": 4, "dpo_steps": 3, "ddp_steps": 3}
    return {"steps": 200, "batch": 4, "length": 128, "eval_rows": 64, "max_chars": None, "calib": 64,
            "distill_steps": 100, "dpo_pairs": 256, "dpo_held": 64, "dpo_steps": 100, "ddp_steps": 10}


def load_base(quick: bool):
    """(model, tokenizer): SmolLM2-135M, or for --quick a tiny random LLaMA on SmolLM2's tokenizer."""
    from efficientml.llm.io.load import load, load_tokenizer

    if not quick:
        return load("smollm2-135m")
    from efficientml.llm.config import LlamaConfig
    from efficientml.llm.model import build_model

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    return build_model(cfg, "cpu").eval(), load_tokenizer("smollm2-135m")


def _rows(r, tok):
    b = budget(r.quick)
    (ids, labels), held = corpus_rows(tok, "tinyshakespeare", b["length"], max_chars=b["max_chars"])
    return b, ids, labels, held[:b["eval_rows"]]


def _sft(model, ids, labels, b, lr):
    cfg = SFTConfig(lr=lr, steps=b["steps"], batch_size=b["batch"], warmup_frac=0.05)
    return train_sft(model, batches(ids, labels, b["batch"], seed=0), cfg, progress=False)


def _merge_route(r, method: str, lora: LoRAConfig) -> dict:
    """Train LoRA on a W4 (``w4lora``) or NF4 (``qlora``) base, merge into W4 both ways, perplexities."""
    from efficientml.finetune.merge_quant import MergeQuantConfig, merge_into_quantized, save_merged
    from efficientml.finetune.w4base import merge_on_base_grid

    base, tok = load_base(r.quick)
    b, ids, labels, held = _rows(r, tok)
    model = prepare(base, method, lora)
    _sft(model, ids, labels, b, 1e-3)
    calib = ids[torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(7))[:b["calib"]]]
    res = merge_on_base_grid(model, calib) if method == "w4lora" else \
        merge_into_quantized(model, calib, MergeQuantConfig(method="gptq"))
    ppl = {k: held_out_loss(m, held)["perplexity"] for k, m in
           (("adapter", model), ("calibrated", res.calibrated), ("naive", res.naive))}
    with tempfile.TemporaryDirectory(prefix="merge_w4_") as tmp:
        paths = save_merged(res.calibrated, tok, Path(tmp) / "merged-w4")
        sizes = {k: sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file()) if Path(p).is_dir()
                 else Path(p).stat().st_size for k, p in paths.items()}
    log("merge_w4", method, ppl)
    return {"perplexity": ppl, "calib_rows": list(calib.shape), "saved_bytes": sizes,
            "report": {k: v for k, v in res.report.items() if k != "calibrated"},
            "ratio": ppl["calibrated"] / ppl["adapter"], "naive_ratio": ppl["naive"] / ppl["adapter"]}


def part_merge_w4(r) -> None:
    out = {"w4_base": _merge_route(r, "w4lora", LoRAConfig(rank=16, alpha=32, target_modules=ATTENTION)),
           "nf4_base": _merge_route(r, "qlora", QLoRAConfig(rank=16, alpha=32, target_modules=ATTENTION))}
    r.rec.results["merge_w4"] = out
    w4, nf4 = out["w4_base"], out["nf4_base"]
    r.rec.target("merge_into_w4_ppl_vs_adapter", w4["ratio"], "<=", 1.02,
                 f"held-out perplexity, LoRA r=16 trained on a W4 g32 base, merged onto the base's grid with GPTQ "
                 f"(scales fixed) ÷ W4 base + adapter; naive merge-then-round {w4['naive_ratio']:.4f}. From an NF4 "
                 f"(QLoRA) base re-quantized to W4 g32: GPTQ {nf4['ratio']:.4f}, naive {nf4['naive_ratio']:.4f}")


def part_bitdelta(r) -> None:
    from efficientml.finetune.bitdelta import compress_delta
    from efficientml.finetune.bitdelta_serve import DeltaServer, distill_scales

    base, tok = load_base(r.quick)
    b, ids, labels, held = _rows(r, tok)
    ft = prepare(copy.deepcopy(base), "full")
    _sft(ft, ids, labels, b, 5e-5)
    for p in ft.parameters():
        p.requires_grad_(False)
    delta = compress_delta(base, ft)
    size = delta.size_report()
    server = DeltaServer(base).add("ft", delta).use("ft")
    ppl_ft = held_out_loss(ft, held)["perplexity"]
    ppl_init = held_out_loss(server, held)["perplexity"]
    calib = ids[torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(8))[:max(4, b["calib"] // 2)]]
    dist = distill_scales(server, "ft", ft, calib, steps=b["distill_steps"], lr=1e-4, batch_size=2)
    ppl_after = held_out_loss(server.use("ft"), held)["perplexity"]
    server.use(None)
    ppl_base = held_out_loss(server, held)["perplexity"]
    out = {"size": size, "perplexity": {"base": ppl_base, "finetune": ppl_ft, "bitdelta_init": ppl_init,
                                        "bitdelta_distilled": ppl_after},
           "distill": {k: v for k, v in dist.items() if k != "curve"}}
    r.rec.results["bitdelta"] = out
    log("bitdelta", out["perplexity"], f"ratio {size['size_ratio']:.2f}")
    r.rec.target("bitdelta_size_ratio", size["size_ratio"], ">=", 10,
                 f"fp16 delta bytes ÷ packed sign bits + fp32 scale, the {size['linears']} linears; with the dense "
                 f"fp16 deltas of the other changed tensors (embedding, norms): {size['size_ratio_total']:.2f}")
    r.rec.target("bitdelta_ppl_vs_finetune", ppl_after / ppl_ft, "<=", 1.05,
                 f"held-out perplexity, base + BitDelta (scales distilled) ÷ the full fine-tune; before "
                 f"distillation {ppl_init / ppl_ft:.4f}")


def part_dpo(r) -> None:
    from efficientml.finetune.dpo import DPOConfig, train_dpo
    from efficientml.finetune.preference import LengthRule, PreferenceSet, preference_pairs, win_rate

    base, tok = load_base(r.quick)
    b, _, _, held = _rows(r, tok)
    rule = LengthRule(max_tokens=12, min_tokens=2)
    pairs = preference_pairs(tok, n_pairs=b["dpo_pairs"], rule=rule, seed=0)
    prompts = [p["prompt"] for p in preference_pairs(tok, n_pairs=b["dpo_held"], rule=rule, seed=1,
                                                     part=(0.9, 1.0))]
    model = prepare(base, "lora", LoRAConfig(rank=16, alpha=32))
    before = {"win": win_rate(model, tok, prompts, rule), "ppl": held_out_loss(model, held)["perplexity"]}
    cfg = DPOConfig(beta=0.1, steps=b["dpo_steps"], batch_size=8 if not r.quick else 2, lr=5e-4,
                    reference="precomputed")
    hist = train_dpo(model, PreferenceSet.encode(tok, pairs), cfg, progress=False)
    after = {"win": win_rate(model, tok, prompts, rule), "ppl": held_out_loss(model, held)["perplexity"]}
    out = {"before": before, "after": after, "config": cfg.to_dict(), "reference": hist["reference"],
           "final": hist["curve"][-1], "seconds": hist["seconds"]}
    r.rec.results["dpo"] = out
    log("dpo", before["win"]["win_rate"], "→", after["win"]["win_rate"])
    r.rec.target("dpo_win_rate", after["win"]["win_rate"], ">=", 0.8,
                 f"held-out prompts, greedy, rule: ends within {rule.max_tokens} tokens with ≥ {rule.min_tokens}; "
                 f"before DPO {before['win']['win_rate']:.3f}; dpo_ppl_drift (TinyShakespeare held-out perplexity "
                 f"after ÷ before) {after['ppl'] / before['ppl']:.4f}")
    r.rec.results["dpo_ppl_drift"] = after["ppl"] / before["ppl"]


def ddp_child(out: str, quick: bool) -> None:
    """Under torchrun or alone: LoRA SFT on the same global batches; rank 0 writes the curve."""
    from efficientml.train.distributed import init_distributed

    torch.set_num_threads(1)
    ctx = init_distributed()
    base, tok = load_base(quick)
    b = budget(quick)
    (ids, labels), _ = corpus_rows(tok, "tinyshakespeare", 64, max_chars=20000)
    model = prepare(base, "lora", LoRAConfig(rank=8, alpha=16, target_modules=ATTENTION))
    cfg = SFTConfig(lr=1e-3, steps=b["ddp_steps"], batch_size=4, grad_accum=2, warmup_frac=0.0)
    hist = train_sft(model, batches(ids, labels, 4, seed=0), cfg, progress=False, dist=ctx)
    if ctx is None or ctx.main:
        Path(out).write_text(json.dumps({"curve": [c["loss"] for c in hist["curve"]], "world": hist["world_size"]}))
    if ctx is not None:
        ctx.close()


def part_ddp(r) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ddp_bench_"))
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    curves = {}
    for n in (1, 2):
        cmd = [sys.executable, __file__, str(tmp / f"{n}.json")] + (["--quick"] if r.quick else [])
        if n > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)] + cmd[1:]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
        if proc.returncode:
            raise RuntimeError(f"ddp child ({n} processes) failed: {proc.stderr[-2000:]}")
        curves[n] = json.loads((tmp / f"{n}.json").read_text())["curve"]
    diff = max(abs(a - b) for a, b in zip(curves[1], curves[2]))
    r.rec.results["ddp"] = {"curves": curves, "max_abs_diff": diff, "backend": "gloo", "tolerance": 1e-5}
    log("ddp", f"max |Δloss| {diff:.2e}")
    r.rec.target("ddp_2proc_matches_single", diff <= 1e-5, "==", True,
                 f"LoRA SFT loss curve, torchrun 2 processes (gloo) vs 1, same global batch 4×2 accumulation; "
                 f"max |Δ| {diff:.2e} ≤ 1e-5")


PARTS = {"merge_w4": part_merge_w4, "bitdelta": part_bitdelta, "dpo": part_dpo, "ddp": part_ddp}

if __name__ == "__main__":
    ddp_child(sys.argv[1], "--quick" in sys.argv[2:])
