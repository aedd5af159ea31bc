"""Efficient fine-tuning benchmark (issue #19): SmolLM2-135M on TinyShakespeare (train on the first 90%,
held-out perplexity on the rest), against full fine-tuning and against peft + transformers.

Parts (``--parts``), recorded in benchmarks/results/finetune.json:

- ``quality``: LoRA r=16 on the attention projections (q, k, v, o: 1.4% of the parameters), QLoRA r=16 (NF4 base, double-quantized scales) and full fine-tuning, the same
  tokens seen (steps × batch × length), held-out perplexity; LoRA's trainable fraction.
- ``memory``: peak resident memory (VmHWM, reset after the model is prepared) of LoRA vs QLoRA training
  steps at the same batch, each in a fresh process so neither sees the other's heap.
- ``merge``: max |logits| difference, fp32, merged vs unmerged, for a LoRA with non-zero B (and DoRA).
- ``merge_w4``, ``bitdelta``, ``dpo``, ``ddp``: see benchmarks/finetune_align.py.
- ``peft``: our adapter loaded by peft onto transformers' LlamaForCausalLM and peft's loaded here (max
  abs logit difference, both directions); training tokens/s, ours vs peft + transformers, same config,
  batch and threads, steps interleaved (median step time); DoRA's step time beside LoRA's.
- ``tinytl``, ``dora`` (benchmarks/finetune_cnn.py): TinyTL / BitFit / last-layer / full fine-tuning of
  the pretrained CIFAR ResNet-20 on Fashion-MNIST with measured training memory; DoRA's step time vs
  LoRA's without peft.

    python benchmarks/finetune.py                 # full mode (long on 2 cores)
    python benchmarks/finetune.py --quick --out /tmp/finetune_quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from efficientml.analysis.record import BenchmarkRecord, add_part_options, default_out, log, run_parts, selected_parts
from efficientml.finetune import LoRAConfig, adapters, merge, trainable_parameters, unmerge
from efficientml.finetune.peft_io import load_adapter, save_adapter
from efficientml.finetune.recipe import corpus_rows, held_out_loss, prepare
from efficientml.finetune.sft import SFTConfig, token_loss, train_sft
from efficientml.finetune.sft_data import batches

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def budget(quick: bool) -> dict:
    if quick:
        return {"steps": 3, "batch": 2, "length": 32, "eval_rows": 2, "max_chars": 20000, "timing_steps": 2}
    return {"steps": 300, "batch": 4, "length": 128, "eval_rows": 64, "max_chars": None, "timing_steps": 6}


def _load():
    from efficientml.llm.io.load import load

    return load("smollm2-135m")


def part_quality(r: "Run") -> None:
    b = budget(r.quick)
    _, tok = _load()
    (ids, labels), held = corpus_rows(tok, "tinyshakespeare", b["length"], max_chars=b["max_chars"])
    held = held[:b["eval_rows"]]
    lora = LoRAConfig(rank=16, alpha=32, target_modules=ATTENTION)  # r=16 on all 7 linears: 3.6% trainable
    lrs = {"lora": 1e-3, "qlora": 1e-3, "full": 5e-5}
    out = {"budget": b, "lr": lrs, "lora_config": lora.to_dict()}
    for method in ("lora", "qlora", "full"):
        model = prepare(_load()[0], method, lora)
        cfg = SFTConfig(lr=lrs[method], steps=b["steps"], batch_size=b["batch"], warmup_frac=0.05)
        hist = train_sft(model, batches(ids, labels, b["batch"], seed=0), cfg, progress=False)
        ev = held_out_loss(model, held)
        out[method] = {"held_out": ev, "trainable": trainable_parameters(model), "tokens": hist["tokens"],
                       "tokens_per_s": hist["tokens_per_s"], "final_train_loss": hist["curve"][-1]["loss"]}
        log(method, f"ppl {ev['perplexity']:.3f}", f"{hist['tokens_per_s']:.0f} tok/s")
        del model
    r.rec.results["quality"] = out
    ppl = {m: out[m]["held_out"]["perplexity"] for m in ("lora", "qlora", "full")}
    r.rec.target("lora_ppl_vs_full_ft", ppl["lora"] / ppl["full"], "<=", 1.05,
                 "TinyShakespeare held-out perplexity, LoRA r=16 ÷ full fine-tuning, same tokens seen")
    r.rec.target("lora_trainable_fraction", out["lora"]["trainable"]["fraction"], "<=", 0.02,
                 "trainable ÷ total parameters (tied embedding counted once)")
    r.rec.target("qlora_ppl_vs_lora", ppl["qlora"] / ppl["lora"], "<=", 1.05,
                 "held-out perplexity, QLoRA (NF4 base, double-quantized scales) ÷ LoRA, same tokens")


def rss_child(method: str, steps: int, batch: int, length: int) -> dict:
    """Runs in a fresh process: prepare, reset the peak, train ``steps`` steps, report VmHWM/VmRSS."""
    from efficientml.core.memory import release_memory

    def status() -> dict:
        txt = Path("/proc/self/status").read_text()
        return {k: int(line.split()[1]) / 1024 for line in txt.splitlines()
                for k in ("VmHWM", "VmRSS") if line.startswith(k + ":")}

    torch.set_num_threads(1)
    model, _ = _load()
    model = prepare(model, method, LoRAConfig(rank=16, alpha=32))
    release_memory()
    before = status()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    train_sft(model, iter(lambda: (ids, ids), None), SFTConfig(lr=1e-4, steps=steps, batch_size=batch), progress=False)
    after = status()
    return {"method": method, "rss_before_train_mb": before["VmRSS"], "peak_rss_train_mb": after["VmHWM"]}


def part_memory(r: "Run") -> None:
    steps, batch, length = (2, 1, 32) if r.quick else (3, 2, 128)
    res = {}
    for method in ("lora", "qlora"):
        cmd = [sys.executable, __file__, "--rss-child", method, "--rss-args", f"{steps},{batch},{length}"]
        root = str(Path(__file__).resolve().parents[1])  # this checkout's package, not an installed one
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
        if proc.returncode:
            raise RuntimeError(f"rss child {method} failed: {proc.stderr[-2000:]}")
        res[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(method, res[method])
    res["batch"], res["length"], res["steps"] = batch, length, steps
    r.rec.results["memory"] = res
    ratio = res["qlora"]["peak_rss_train_mb"] / res["lora"]["peak_rss_train_mb"]
    r.rec.target("qlora_peak_rss_vs_lora", ratio, "<=", 0.6,
                 f"peak RSS of training steps (VmHWM, process included), batch {batch}×{length}, fresh processes")


def part_merge(r: "Run") -> None:
    ids = torch.randint(0, 49152, (1, 16 if r.quick else 64), generator=torch.Generator().manual_seed(1))
    res = {}
    for name, cfg in (("lora", LoRAConfig(rank=16, alpha=32)), ("dora", LoRAConfig(rank=16, alpha=32, dora=True))):
        model = prepare(_load()[0], "lora", cfg)
        _randomize(model)
        with torch.no_grad():
            a = model(ids)
            merge(model)
            b = model(ids)
            unmerge(model)
            c = model(ids)
        res[name] = {"merged_vs_unmerged": (a - b).abs().max().item(), "unmerged_again": (a - c).abs().max().item(),
                     "logit_scale": a.abs().max().item()}
    r.rec.results["merge"] = res
    r.rec.target("lora_merge_max_abs_diff", max(v["merged_vs_unmerged"] for v in res.values()), "<=", 1e-5,
                 "fp32 logits, merged vs unmerged, LoRA and DoRA r=16 with non-zero B (max of both)")


def _randomize(model, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def _hf(model, tok, folder: Path):
    import transformers

    from efficientml.llm.io.load import save_hf

    if not folder.exists():
        save_hf(model, tok, folder)
    return transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                        attn_implementation="sdpa").eval()


def part_peft(r: "Run") -> None:
    try:
        import peft
    except ImportError as e:
        for tid, (op, th) in (("peft_roundtrip_max_abs_diff", ("<=", 1e-4)), ("lora_train_tokens_per_s_vs_peft", (">=", 1.0))):
            r.rec.target(tid, None, op, th, f"peft is not installed ({e})")
        return
    tmp = Path(tempfile.mkdtemp(prefix="ft_bench_"))
    base, tok = _load()
    cfg = LoRAConfig(rank=16, alpha=32)
    ids = torch.randint(0, 49152, (2, 16 if r.quick else 64), generator=torch.Generator().manual_seed(2))
    ours = prepare(_load()[0], "lora", cfg)
    _randomize(ours)
    save_adapter(ours, tmp / "ours", cfg, "smollm2-135m")
    theirs = peft.PeftModel.from_pretrained(_hf(base, tok, tmp / "hf"), str(tmp / "ours")).eval()
    with torch.no_grad():
        d1 = (theirs(ids).logits - ours(ids)).abs().max().item()
    pc = peft.LoraConfig(r=16, lora_alpha=32, target_modules=list(cfg.target_modules))
    made = peft.get_peft_model(_hf(base, tok, tmp / "hf"), pc)
    _randomize(made, seed=4)
    made.save_pretrained(str(tmp / "theirs"))
    back, _ = load_adapter(_load()[0], tmp / "theirs")
    with torch.no_grad():
        d2 = (made.eval()(ids).logits - back(ids)).abs().max().item()
    res = {"ours_in_peft": d1, "peft_in_ours": d2}
    res.update(_throughput(r.quick, ours, made, base.config.vocab_size, cfg))
    r.rec.results["peft"] = res
    r.rec.target("peft_roundtrip_max_abs_diff", max(d1, d2), "<=", 1e-4,
                 "fp32 logits: peft loading our adapter vs ours, and ours loading peft's vs peft (max)")
    r.rec.target("lora_train_tokens_per_s_vs_peft", res["ours_tokens_per_s"] / res["peft_tokens_per_s"], ">=", 1.0,
                 f"training step (forward+backward+AdamW), r=16 on all block linears, batch {res['batch']}, "
                 f"{res['threads']} threads, interleaved median")


def _throughput(quick: bool, ours, theirs, vocab: int, cfg: LoRAConfig) -> dict:
    b = budget(quick)
    batch, length = b["batch"], b["length"]
    ids = torch.randint(0, vocab, (batch, length + 1), generator=torch.Generator().manual_seed(5))
    dora = prepare(_load()[0], "lora", LoRAConfig(rank=16, alpha=32, dora=True))
    models = {"ours": ours, "peft": theirs, "dora": dora}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5) for k, m in models.items()}

    def step(k: str) -> float:
        m, opt = models[k], opts[k]
        m.train()
        t0 = time.perf_counter()
        if k == "peft":
            loss = m(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        else:
            loss, n = token_loss(m, ids, ids)
            loss = loss / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    times = {k: [] for k in models}
    for i in range(1 + b["timing_steps"]):
        for k in models:
            t = step(k)
            if i:  # the first round is warm-up
                times[k].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = batch * length
    return {"batch": batch, "length": length, "threads": torch.get_num_threads(), "median_step_s": med,
            "ours_tokens_per_s": tokens / med["ours"], "peft_tokens_per_s": tokens / med["peft"],
            "dora_step_time_vs_lora": med["dora"] / med["ours"]}


sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling files with more parts
from finetune_align import PARTS as ALIGN_PARTS  # noqa: E402  merge_w4, bitdelta, dpo, ddp (their docstring)
from finetune_cnn import part_dora, part_tinytl  # noqa: E402

PARTS = {"quality": part_quality, "memory": part_memory, "merge": part_merge, "peft": part_peft,
         "tinytl": part_tinytl, "dora": part_dora}
PARTS.update(ALIGN_PARTS)


class Run:
    def __init__(self, args: argparse.Namespace, rec: BenchmarkRecord) -> None:
        self.quick, self.rec = args.quick, rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_part_options(ap, PARTS, merge=False)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rss-args", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        steps, batch, length = (int(v) for v in args.rss_args.split(","))
        print(json.dumps(rss_child(args.rss_child, steps, batch, length)))
        return 0
    torch.set_num_threads(args.threads)
    out = default_out("finetune", args.quick, args.out)
    rec = BenchmarkRecord("finetune")

    def done(name: str, seconds: float) -> None:
        rec.results.setdefault("seconds", {})[name] = round(seconds, 1)
        rec.write(out)

    run_parts(PARTS, selected_parts(PARTS, args.parts), Run(args, rec), after=done)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
