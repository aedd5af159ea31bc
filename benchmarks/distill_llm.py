"""Part ``llm`` of benchmarks/distill.py: SmolLM2-135M made shallower, then recovered two ways on the same tokens.

The teacher is SmolLM2-135M (fp32). The student is the teacher with the ``drop`` blocks of least influence
removed (:func:`efficientml.distill.llm.block_influence` on calibration rows from the training side):
a real, smaller model. Two copies of it are trained for the same steps on the same batches (same
order, same learning rate and schedule): one by logit distillation from the teacher (``alpha = 1``,
T = 1), one by plain next-token cross-entropy (``alpha = 0``). WikiText-2 (raw test split): the first
90 % trains, the last 10 % is held out. ``llm_kd_vs_ce_ppl_ratio`` = held-out perplexity after KD ÷ after
cross-entropy (< 1: distillation recovers more).

Teacher correction (Minitron): SmolLM2 never saw WikiText-2's distribution the way the CE arm does, so the
original teacher teaches its own shift (measured here too: the ``uncorrected`` arms, the student shrunk
from and taught by the original). The protocol of the target first fine-tunes the teacher by CE on the
same batches (:func:`efficientml.distill.llm.correct_teacher`), shrinks the corrected teacher, and
recovers from it: KD (alpha 1), KD + CE (alpha 0.5) and CE, each from the same shrunk model.
"""

from __future__ import annotations

import copy
import time

import torch

from efficientml.analysis.record import log


def llm_budget(quick: bool) -> dict:
    if quick:
        return {"drop": 1, "steps": 3, "batch": 2, "length": 32, "eval_rows": 4, "calib_rows": 4, "lr": 1e-3,
                "max_chars": 20000}
    return {"drop": 6, "steps": 60, "batch": 4, "length": 128, "eval_rows": 96, "calib_rows": 32, "lr": 1e-4,
            "max_chars": None}


def _teacher(quick: bool):
    from efficientml.llm.io.load import load, load_tokenizer

    if not quick:
        return load("smollm2-135m")
    from efficientml.llm.config import LlamaConfig
    from efficientml.llm.model import build_model

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    return build_model(cfg, "cpu").eval(), load_tokenizer("smollm2-135m")


def _recover(base, teacher, ids, labels, held, b, arms) -> tuple[dict, dict]:
    """Each arm (name, alpha) trains a copy of ``base`` on the same batches; (perplexities, run records)."""
    from efficientml.distill.llm import LLMDistillConfig, distill_llm
    from efficientml.finetune.recipe import held_out_loss
    from efficientml.finetune.sft_data import batches

    ppl, runs = {}, {}
    for arm, alpha in arms:
        student = copy.deepcopy(base).requires_grad_(True)  # full fine-tuning of every remaining weight
        cfg = LLMDistillConfig(steps=b["steps"], lr=b["lr"], alpha=alpha, temperature=1.0, warmup_frac=0.05)
        t0 = time.perf_counter()
        res = distill_llm(student, teacher if alpha > 0 else None, batches(ids, labels, b["batch"], seed=0), cfg)
        ppl[arm] = held_out_loss(student, held)["perplexity"]
        runs[arm] = {"config": cfg.to_dict(), "seconds": time.perf_counter() - t0, "tokens": res["tokens"],
                     "curve": [{k: round(v, 4) for k, v in c.items()} for c in res["curve"][::5]]}
        log("llm", arm, f"ppl {ppl[arm]:.2f}", f"{runs[arm]['seconds']:.0f} s")
        del student
    return ppl, runs


def _shrunk(teacher, ids, b):
    from efficientml.distill.llm import block_influence, drop_layers, lowest

    calib = ids[torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(11))[:b["calib_rows"]]]
    influence = block_influence(teacher, calib)
    drop = lowest(influence, b["drop"])
    return drop_layers(copy.deepcopy(teacher), drop), drop, influence


ARMS = (("kd", 1.0), ("kd_ce", 0.5), ("ce", 0.0))


def part_llm(r) -> None:
    from efficientml.distill.llm import LLMDistillConfig, correct_teacher
    from efficientml.finetune.recipe import corpus_rows, held_out_loss
    from efficientml.finetune.sft_data import batches

    b = llm_budget(r.quick)
    teacher, tok = _teacher(r.quick)
    teacher = teacher.float().requires_grad_(False)
    (ids, labels), held = corpus_rows(tok, "wikitext2-raw-test", b["length"], max_chars=b["max_chars"])
    held = held[:b["eval_rows"]]
    ppl = {"teacher": held_out_loss(teacher, held)["perplexity"]}
    # without correction: the student shrunk from the original, taught by the original
    base, drop0, _ = _shrunk(teacher, ids, b)
    ppl["uncorrected_pruned"] = held_out_loss(base, held)["perplexity"]
    p0, runs0 = _recover(base, teacher, ids, labels, held, b, (("kd", 1.0), ("ce", 0.0)))
    # Minitron: correct the teacher on the same batches, shrink the corrected teacher, recover from it
    fixed, corr = correct_teacher(teacher, batches(ids, labels, b["batch"], seed=0),
                                  LLMDistillConfig(steps=b["steps"], lr=b["lr"], alpha=0.0, warmup_frac=0.05))
    ppl["corrected_teacher"] = held_out_loss(fixed, held)["perplexity"]
    base, drop, influence = _shrunk(fixed, ids, b)
    ppl["pruned"] = held_out_loss(base, held)["perplexity"]
    log("llm", f"drop {drop}", ppl)
    p1, runs = _recover(base, fixed, ids, labels, held, b, ARMS)
    ppl.update(p1)
    ppl["uncorrected"] = p0
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    r.rec.results["llm"] = {
        "budget": b, "dropped_blocks": drop, "dropped_blocks_uncorrected": drop0,
        "influence": {str(k): round(v, 5) for k, v in influence.items()},
        "blocks": [teacher.config.num_hidden_layers, base.config.num_hidden_layers],
        "parameters": [n(teacher), n(base)], "perplexity": ppl, "runs": runs, "runs_uncorrected": runs0,
        "teacher_correction": {"seconds": corr["seconds"], "tokens": corr["tokens"]},
        "data": "WikiText-2 raw test split: first 90% trains, last 10% held out; rows of "
                f"{b['length']} tokens", "same_tokens": True}
    best = min(("kd", "kd_ce"), key=lambda a: ppl[a])
    r.rec.target("llm_kd_vs_ce_ppl_ratio", ppl["kd"] / ppl["ce"], "<", 1.0,
                 f"held-out WikiText-2 perplexity, SmolLM2-135M minus {len(drop)} of "
                 f"{teacher.config.num_hidden_layers} blocks recovered by KD (alpha 1, T 1) from the corrected teacher "
                 f"÷ by plain CE, {b['steps']} steps × {b['batch']}×{b['length']} tokens each, both from the same "
                 f"shrunk corrected teacher; KD+CE (alpha 0.5) {ppl['kd_ce'] / ppl['ce']:.3f} (best KD arm: {best}); "
                 f"without teacher correction KD ÷ CE = {p0['kd'] / p0['ce']:.3f}")
