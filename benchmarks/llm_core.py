"""LLM core benchmark: SmolLM2-135M (GGUF → fp32) against Hugging Face transformers on the same weights.

Parts (``--part``), each recorded in benchmarks/results/llm_core.json with the commit it ran on:

- ``ppl``: WikiText-2 raw test perplexity at context 1024, non-overlapping windows (the protocol of
  efficientml.llm.eval), ours and transformers' scored on the same windows. The two run alternately
  window by window, so load from other processes on the machine hits both alike; the time of each is
  the sum over its windows.
- ``decode``: batch-1 greedy generation from the same prompt; prefill tok/s = prompt / t(1 token),
  decode tok/s = (N − 1) / (t(N tokens) − t(1 token)), the same external timing for both; median of
  interleaved repeats. Achieved GB/s = bytes read per decode step × tok/s, against the machine's
  measured read bandwidth.
- ``decode-batch``: the same for 4 prompts of different lengths in one left-padded batch (no target;
  per-row and batch tok/s, and one step's products alone at 1, 4 and 8 rows).
- ``gpu``: on a CUDA machine, bf16 decode at batch 1 and 16 for SmolLM2-135M and a random model with
  Llama-2-7B's shapes, with the decode step in a CUDA graph, against transformers' ``generate``;
  written to llm_core_gpu.json.

    python benchmarks/llm_core.py --part ppl      # ≈ 2 × 80 TFLOP on CPU: long
    python benchmarks/llm_core.py --part decode
    python benchmarks/llm_core.py --parts ppl,decode
    python benchmarks/llm_core.py --quick         # a few windows / tokens, for CI (JSONs to temp files)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from efficientml.analysis.record import (REPO_ROOT, BenchmarkRecord, add_part_options, default_out, git_commit,
                                         log, merge_records, read_record, run_parts, selected_parts)

RESULTS = REPO_ROOT / "benchmarks" / "results"
PROMPT = ("The history of the Roman Empire spans more than a thousand years, from the founding of the "
          "city to the fall of Constantinople. In this essay we describe its institutions, its army, "
          "its economy and the reasons for its long survival.")


def read_bandwidth_gbs(device: str = "cpu", mb: int = 512, reps: int = 7) -> dict:
    """Read bandwidth (sum over a large fp32 tensor) and copy bandwidth (read + write), median."""
    n = mb * (1 << 20) // 4
    x = torch.ones(n, device=device)
    y = torch.empty_like(x)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(fn) -> float:
        fn()
        sync()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    t_read = timed(lambda: x.sum())
    t_copy = timed(lambda: y.copy_(x))
    nbytes = n * 4
    return {"read_gbs": nbytes / t_read / 1e9, "copy_gbs": 2 * nbytes / t_copy / 1e9, "buffer_mb": mb}


@torch.inference_mode()
def gemv_chain(model, reps: int = 15, rows: int = 1) -> dict:
    """One decode step's matrix-vector products alone (the model's own weights, ``rows`` fp32 input
    rows each: the batch), three ways: the cpu_gemv kernel on (out, in) weights, F.linear on (out, in)
    weights (MKL, the default layout) and F.linear on (in, out)-contiguous weights (MKL,
    decode_layout). GB/s = weight bytes ÷ median time."""
    import torch.nn.functional as F

    from efficientml.llm.kernels import cpu_gemv

    ws = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        ws += [torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), a.o_proj.weight,
               torch.cat([m.gate_proj.weight, m.up_proj.weight]), m.down_proj.weight]
    ws.append(model.lm_head.weight)
    ws = [w.detach().contiguous() for w in ws]  # (out, in)
    wt = [w.t().contiguous().t() for w in ws]  # same values, (in, out)-contiguous
    xs = [torch.randn(rows, w.shape[1]) for w in ws]
    nbytes = sum(w.numel() * w.element_size() for w in ws)
    ways = {"mkl_out_in": lambda: [F.linear(x, w) for x, w in zip(xs, ws)],
            "mkl_in_out_decode_layout": lambda: [F.linear(x, w) for x, w in zip(xs, wt)]}
    if cpu_gemv.available():
        ways["cpu_gemv_out_in"] = lambda: [cpu_gemv.gemv(x, w) for x, w in zip(xs, ws)]
    out = {}
    for name, fn in ways.items():
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        med = statistics.median(ts)
        out[name] = {"ms": med * 1e3, "gbs": nbytes / med / 1e9, "matrices": len(ws), "bytes": nbytes,
                     "rows": rows}
    return out


def decode_bytes_per_token(model, context_len: int) -> int:
    """Bytes a decode step must read: every weight except the embedding table (one row is gathered;
    when tied, lm_head reads the table once), plus the cached keys/values."""
    cfg = model.config
    n = 0
    for name, p in model.named_parameters():
        if name == "model.embed_tokens.weight":
            continue
        n += p.numel() * p.element_size()
    if cfg.tie_word_embeddings:
        w = model.model.embed_tokens.weight
        n += w.numel() * w.element_size()
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.dim_per_head * context_len
    return n + kv * next(model.parameters()).element_size()


def load_pair(dtype=torch.float32, device="cpu"):
    from transformers import LlamaForCausalLM as HFLlama

    from efficientml.llm.io.load import load, save_hf

    t = time.perf_counter()
    model, tok = load("smollm2-135m", dtype=dtype, device=device)
    load_s = time.perf_counter() - t
    tmp = Path(tempfile.mkdtemp(prefix="llm_core_"))
    save_hf(model, tok, tmp / "hf")
    hf = HFLlama.from_pretrained(str(tmp / "hf"), dtype=dtype, attn_implementation="sdpa").to(device).eval()
    return model, tok, hf, tmp / "hf", load_s


@torch.inference_mode()
def hf_score(hf, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """transformers' logits for the window, scored exactly like ours (fp32 log-softmax, sum)."""
    from efficientml.llm.eval import IGNORE

    logits = hf(input_ids=x.to(hf.device)).logits.float()  # (B, T, V)
    y = y.to(logits.device)
    keep = y != IGNORE
    return float(F.cross_entropy(logits[keep], y[keep], reduction="sum").double()), int(keep.sum())


def part_ppl(rec: BenchmarkRecord, quick: bool, progress_path: Path | None = None,
             stop_after_s: float | None = None, device: str = "cpu") -> None:
    """Ours and transformers' perplexity window by window. Sums are saved to ``progress_path`` after
    every window, and a rerun resumes from there (the windows are deterministic), so a long run can be
    interrupted. ``stop_after_s`` ends early and records how many windows were evaluated."""
    import math

    from transformers import AutoTokenizer

    from efficientml.data.text import load_text
    from efficientml.llm.eval import PerplexityProtocol, _batches, num_windows, score_window_batch

    from efficientml.llm.io.load import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    tok_dir = Path(tempfile.mkdtemp(prefix="llm_core_tok_"))
    tok.save(tok_dir)
    text = load_text("wikitext2-raw-test")
    proto = PerplexityProtocol(context=1024)
    ids = tok.encode(text, add_bos=False)
    hf_ids = AutoTokenizer.from_pretrained(str(tok_dir))(text, add_special_tokens=False).input_ids
    n_win = num_windows(len(ids), proto)
    max_win = 3 if quick else n_win
    state = {"done": 0, "ours": [0.0, 0, 0.0], "transformers": [0.0, 0, 0.0], "commits": []}  # nll, count, s
    if progress_path is not None and progress_path.is_file():
        state = json.loads(progress_path.read_text())
        log(f"resuming after {state['done']} windows from {progress_path}")
    if git_commit() not in state["commits"]:
        state["commits"].append(git_commit())
    log(f"ppl: {len(ids)} tokens, {n_win} windows of {proto.context}; evaluating {max_win}")
    t_start = time.perf_counter()
    if state["done"] < max_win and (stop_after_s is None or stop_after_s > 0):  # models only if work remains
        model, _, hf, _, _ = load_pair(device=device)
        score = {"ours": lambda x, y: score_window_batch(model, x, y),
                 "transformers": lambda x, y: hf_score(hf, x, y)}
    for i, (x, y) in enumerate(_batches(ids, proto, tok.bos_id, 1)):
        if i < state["done"]:
            continue
        if i >= max_win or (stop_after_s is not None and time.perf_counter() - t_start >= stop_after_s):
            break
        order = ["ours", "transformers"] if i % 2 == 0 else ["transformers", "ours"]
        for who in order:
            t = time.perf_counter()
            nll, n = score[who](x, y)  # returns Python numbers: the device has finished
            dt = time.perf_counter() - t
            s = state[who]
            s[0] += nll
            s[1] += n
            s[2] += dt
        state["done"] = i + 1
        if progress_path is not None:  # atomically: the run may be stopped at any moment
            tmp = progress_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(progress_path)
        if i % 5 == 0 or i == max_win - 1:
            el = time.perf_counter() - t_start
            log(f"window {i + 1}/{max_win}: ours {state['ours'][2]:.0f} s, transformers "
                f"{state['transformers'][2]:.0f} s, ppl {math.exp(state['ours'][0] / state['ours'][1]):.4f} vs "
                f"{math.exp(state['transformers'][0] / state['transformers'][1]):.4f}, elapsed {el:.0f} s")
    done = state["done"]
    res = {}
    for who in ("ours", "transformers"):
        nll, cnt, secs = state[who]
        res[who] = {"perplexity": math.exp(nll / cnt), "nll_sum": nll, "tokens_scored": cnt,
                    "seconds": secs, "tokens_per_s": cnt / secs}
    diff = abs(res["ours"]["perplexity"] - res["transformers"]["perplexity"])
    ratio = res["ours"]["seconds"] / res["transformers"]["seconds"]
    full = done == n_win
    scope = "full file" if full else f"first {done} of {n_win} windows"
    rec.results["ppl"] = {
        "commits": state["commits"], "text": f"wikitext2-raw-test ({scope})",
        "characters": len(text), "tokens": len(ids), "windows_total": n_win, "windows_evaluated": done,
        "complete": full,
        "token_ids_identical_to_transformers_tokenizer": ids == hf_ids,
        "protocol": {"context": proto.context, "stride": proto.step, "bos": proto.add_bos,
                     "scored": "every token except the first of each window",
                     "batch_size": 1, "dtype": "float32", "threads": torch.get_num_threads(),
                     "device": device if device == "cpu" else torch.cuda.get_device_name()},
        **res, "abs_diff": diff, "time_ratio_ours_over_transformers": ratio,
    }
    rec.target("wikitext2_ppl_abs_diff_vs_transformers", diff, "<=", 0.01,
               note=f"|ours − transformers| perplexity, same windows, fp32 on {device} ({scope})")
    rec.target("ppl_eval_time_ratio_vs_transformers", ratio, "<=", 1.0,
               note=f"our total seconds ÷ transformers', alternating window by window, on {device}"
                    f"{'' if device != 'cpu' else f', {torch.get_num_threads()} threads'} ({scope})")


def _time_generate(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


@torch.inference_mode()
def part_decode(rec: BenchmarkRecord, quick: bool, args_new_tokens: int = 64, args_repeats: int = 3) -> None:
    from efficientml.llm.generate import SamplingConfig, generate

    from efficientml.llm.kernels import cpu_gemv
    from efficientml.llm.kernels.decode import prepare_cpu_decode

    model, tok, hf, _, load_s = load_pair()
    t = time.perf_counter()
    path = prepare_cpu_decode(model)  # what `efficientml llm generate/chat` do on CPU
    prepare_s = time.perf_counter() - t
    log(f"decode path: {path}")
    ids = tok.encode(PROMPT)
    x = torch.tensor([ids])
    N = 8 if quick else args_new_tokens
    reps = 2 if quick else args_repeats
    ours = {1: [], N: []}
    theirs = {1: [], N: []}
    same = None
    from efficientml.llm.kv_cache import StaticKVCache

    cache = StaticKVCache.for_model(model, 1, len(ids) + N, static_shapes=True)

    def ours_gen(n: int):  # the decode step compiled once for this cache (generate(use_compile=True))
        cache.reset()
        return generate(model, ids, SamplingConfig(max_new_tokens=n), cache=cache, use_compile=True)

    t = time.perf_counter()
    ours_gen(4)  # warm-up: compiles the step
    compile_s = time.perf_counter() - t
    hf.generate(x, max_new_tokens=4, do_sample=False)
    for r in range(reps):  # interleaved, so both see the same machine load
        for n in (1, N):
            t = time.perf_counter()
            out = ours_gen(n)
            ours[n].append(time.perf_counter() - t)
            t = time.perf_counter()
            o = hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, top_p=None, top_k=None,
                            temperature=None)
            theirs[n].append(time.perf_counter() - t)
            if n == N and same is None:
                same = o[0, len(ids):].tolist() == out.tokens[0]
        log(f"decode rep {r + 1}/{reps}: ours {ours[N][-1]:.2f} s, transformers {theirs[N][-1]:.2f} s for {N} tokens")
    bw = read_bandwidth_gbs("cpu")
    bpt = decode_bytes_per_token(model, len(ids) + N // 2)
    chain = gemv_chain(model, reps=5 if quick else 15)
    log("matrix-vector chain GB/s: " + ", ".join(f"{k} {v['gbs']:.1f}" for k, v in chain.items()))

    def summary(d: dict) -> dict:
        t1, tn = statistics.median(d[1]), statistics.median(d[N])
        dec = (N - 1) / (tn - t1)
        return {"t_1_token_s": t1, f"t_{N}_tokens_s": tn, "prefill_tok_s": len(ids) / t1, "decode_tok_s": dec,
                "achieved_gbs": bpt * dec / 1e9, "runs_1": d[1], f"runs_{N}": d[N]}

    so, st = summary(ours), summary(theirs)
    speedup = so["decode_tok_s"] / st["decode_tok_s"]
    rec.results["decode"] = {
        "commit": git_commit(), "prompt_tokens": len(ids), "new_tokens": N, "batch": 1, "dtype": "float32",
        "threads": torch.get_num_threads(), "greedy_tokens_identical": same, "repeats": reps,
        "ours": so, "transformers": st, "speedup": speedup, "our_load_s": load_s,
        "bandwidth": bw, "bytes_per_token": bpt, "ours_decode_path": path, "cpu_gemv": cpu_gemv.status(),
        "ours_decode_step": "torch.compile (inductor, CPU) over a static-shape cache, compiled once in the warm-up",
        "ours_compile_s": compile_s,
        "prepare_s": prepare_s,
        "matrix_vector_chain": chain,
        "bandwidth_bound_tok_s": bw["read_gbs"] * 1e9 / bpt,
        "ours_fraction_of_read_bandwidth": so["achieved_gbs"] / bw["read_gbs"],
        "transformers_cache": "DynamicCache (generate default)",
    }
    rec.target("cpu_decode_speedup_vs_transformers", speedup, ">=", 1.5,
               note=f"decode tok/s ours ÷ transformers generate, batch 1, greedy, {N} new tokens, fp32, "
                    f"2 threads; ours ({path.split(',')[0]}) {so['decode_tok_s']:.1f} tok/s = {so['achieved_gbs']:.1f} GB/s of "
                    f"{bw['read_gbs']:.1f} GB/s measured read bandwidth" + (" (quick)" if quick else ""))


BATCH_PROMPTS = ["The capital of France is", PROMPT, "Water boils at a temperature of",
                 "Once upon a time, in a small village by the sea, there lived an old fisherman who"]


@torch.inference_mode()
def part_decode_batch(rec: BenchmarkRecord, quick: bool, new_tokens: int = 64, repeats: int = 3) -> None:
    """Greedy generation for 4 prompts of different lengths in one left-padded batch (fp32, CPU),
    ours (compiled step, the matrix-vector kernel takes all 4 rows at once) against transformers'
    generate on the same padded batch and attention mask; tok/s per row and for the batch, the same
    external timing as ``decode``. Also one step's products alone at 1, 4 and 8 rows."""
    from efficientml.llm.kernels import cpu_gemv
    from efficientml.llm.generate import SamplingConfig, generate
    from efficientml.llm.kernels.decode import prepare_cpu_decode
    from efficientml.llm.kv_cache import StaticKVCache

    model, tok, hf, _, _ = load_pair()
    path = prepare_cpu_decode(model)
    rows = [tok.encode(p) for p in BATCH_PROMPTS]
    B, T = len(rows), max(map(len, rows))
    pad = model.config.pad_token_id or 0
    x = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    N = 8 if quick else new_tokens
    reps = 2 if quick else repeats
    cache = StaticKVCache.for_model(model, B, T + N, static_shapes=True)

    def ours(n: int):
        cache.reset()
        return generate(model, rows, SamplingConfig(max_new_tokens=n), cache=cache, use_compile=True)

    def theirs(n: int):
        return hf.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           top_p=None, top_k=None, temperature=None, pad_token_id=pad)

    t = time.perf_counter()
    ours(4)
    compile_s = time.perf_counter() - t
    theirs(4)
    times = {"ours": {1: [], N: []}, "transformers": {1: [], N: []}}
    same = None
    for r in range(reps):
        for n in (1, N):
            t = time.perf_counter()
            out = ours(n)
            times["ours"][n].append(time.perf_counter() - t)
            t = time.perf_counter()
            o = theirs(n)
            times["transformers"][n].append(time.perf_counter() - t)
            if n == N and same is None:  # up to each row's first EOS: min_new_tokens masks EOS in theirs
                eos = set(model.config.eos_token_ids) | {tok.eos_id}
                mine = [a[:next((i for i, t in enumerate(a) if t in eos), len(a))] for a in out.tokens]
                same = all(a == b[:len(a)] for a, b in zip(mine, o[:, T:].tolist()))
        log(f"batch decode rep {r + 1}/{reps}: ours {times['ours'][N][-1]:.2f} s, "
            f"transformers {times['transformers'][N][-1]:.2f} s for {N} tokens × {B} rows")
    res: dict = {
        "commit": git_commit(), "batch": B, "prompt_tokens": [len(r) for r in rows], "padded_to": T,
        "new_tokens": N, "dtype": "float32", "threads": torch.get_num_threads(), "repeats": reps,
        "greedy_tokens_identical": same,
        "tokens_compared": "each row up to its first EOS (transformers' min_new_tokens masks EOS, so its rows "
                           "go on with the runner-up there; both run N steps)",
        "ours_decode_path": path, "cpu_gemv": cpu_gemv.status(), "ours_compile_s": compile_s,
    }
    for who, d in times.items():
        t1, tn = statistics.median(d[1]), statistics.median(d[N])
        per_row = (N - 1) / (tn - t1)
        res[who] = {"t_1_token_s": t1, f"t_{N}_tokens_s": tn, "decode_tok_s_per_row": per_row,
                    "decode_tok_s_batch": per_row * B, "runs_1": d[1], f"runs_{N}": d[N]}
    res["speedup"] = res["ours"]["decode_tok_s_per_row"] / res["transformers"]["decode_tok_s_per_row"]
    res["matrix_vector_chain_by_rows"] = {str(k): gemv_chain(model, reps=5 if quick else 11, rows=k)
                                          for k in (1, 4, 8)}
    log(f"batch {B}: ours {res['ours']['decode_tok_s_batch']:.1f} tok/s, transformers "
        f"{res['transformers']['decode_tok_s_batch']:.1f} tok/s ({res['speedup']:.2f}×), same tokens: {same}")
    rec.results["decode_batch"] = res


def _decode_rates(model, hf, batch: int, prompt_len: int, n_ours: int, n_theirs: int, reps: int,
                  use_compile: bool = False) -> dict:
    """Decode tok/s per row, ours (CUDA-graph step over a static cache) and transformers' generate,
    timed the same way from outside: (N − 1) / (t(N tokens) − t(1 token)), median of ``reps``."""
    from efficientml.llm.generate import SamplingConfig, generate
    from efficientml.llm.kv_cache import StaticKVCache

    dev = model.device
    x = torch.randint(100, 1000, (batch, prompt_len), device=dev)
    cache = StaticKVCache.for_model(model, batch, prompt_len + n_ours, static_shapes=True)

    def ours(n):
        cache.reset()  # the same cache keeps its captured graph
        return generate(model, x, SamplingConfig(max_new_tokens=n), cache=cache, use_compile=use_compile)

    def theirs(n):
        return hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           attention_mask=torch.ones_like(x), pad_token_id=0)

    row: dict = {"batch": batch, "prompt_tokens": prompt_len}
    sides = [("ours", ours, n_ours)] + ([("transformers", theirs, n_theirs)] if hf is not None else [])
    for who, fn, n in sides:
        t = time.perf_counter()
        fn(min(4, n))  # warm-up (graph capture / compile for ours)
        torch.cuda.synchronize()
        warm = time.perf_counter() - t
        t1 = _time_generate(lambda: (fn(1), torch.cuda.synchronize()), reps)
        tn = _time_generate(lambda: (fn(n), torch.cuda.synchronize()), reps)
        row[who] = {"new_tokens": n, "t1_s": t1, "tN_s": tn, "warmup_s": warm,
                    "decode_tok_s_per_row": (n - 1) / (tn - t1)}
    bpt = decode_bytes_per_token(model, prompt_len + n_ours // 2)
    row["bytes_per_token_step"] = bpt
    row["ours"]["achieved_gbs"] = bpt * row["ours"]["decode_tok_s_per_row"] / 1e9
    if hf is not None:
        row["speedup"] = row["ours"]["decode_tok_s_per_row"] / row["transformers"]["decode_tok_s_per_row"]
    return row


def _kernel_kind(name: str) -> str:
    n = name.lower()
    if "gemv" in n or "gemm" in n or "cutlass" in n or "sm90_xmma" in n or "cublas" in n or "nvjet" in n:
        return "matmul"
    if "flash" in n or "fmha" in n or "attention" in n or "sdpa" in n:
        return "attention"
    return "other"


@torch.inference_mode()
def profile_decode_step(model, steps: int = 20, prompt_len: int = 128) -> dict:
    """Where a batch-1 decode step's time goes on the GPU: kernel time by kind (matmul, attention,
    other: norms, RoPE, cache writes, elementwise), kernels per step, and the wall time per step (the
    difference is launch gaps and host work). Profiles ``generate`` (CUDA-graph step) with 1 and with
    ``steps + 1`` new tokens and divides the difference by ``steps``, so the prefill drops out."""
    from torch.profiler import ProfilerActivity, profile

    from efficientml.llm.generate import SamplingConfig, generate
    from efficientml.llm.kv_cache import StaticKVCache

    x = torch.randint(100, 1000, (1, prompt_len), device=model.device)
    cache = StaticKVCache.for_model(model, 1, prompt_len + steps + 1, static_shapes=True)
    generate(model, x, SamplingConfig(max_new_tokens=4), cache=cache)  # capture outside the profile

    def run(n_new: int) -> tuple[dict, dict, int, float]:
        cache.reset()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            generate(model, x, SamplingConfig(max_new_tokens=n_new), cache=cache)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
        kinds: dict[str, float] = {}
        names: dict[str, float] = {}
        count = 0
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                us = getattr(e, "device_time_total", None) or e.cuda_time_total
                kinds[_kernel_kind(e.name)] = kinds.get(_kernel_kind(e.name), 0.0) + us
                names[e.name[:80]] = names.get(e.name[:80], 0.0) + us
                count += 1
        return kinds, names, count, wall

    k1, n1, c1, w1 = run(1)
    kn, nn_, cn, wn = run(steps + 1)
    per = {k: (kn.get(k, 0.0) - k1.get(k, 0.0)) / steps for k in sorted(set(kn) | set(k1))}
    top = {k: (v - n1.get(k, 0.0)) / steps for k, v in nn_.items()}
    return {"steps": steps,
            "per_step_us": per | {"kernels_total": sum(per.values()), "wall": (wn - w1) * 1e6 / steps},
            "kernels_per_step": (cn - c1) / steps,
            "top_kernels_us_per_step": dict(sorted(top.items(), key=lambda kv: -kv[1])[:12])}


@torch.inference_mode()
def gpu_gemv_shapes(model, iters: int = 50) -> dict:
    """Each distinct matrix-vector shape of ``model`` alone: cuBLAS (F.linear) vs the Triton kernel,
    GB/s = weight bytes ÷ median time (CUDA events), 4 copies of the weight used in turn so the
    reads come from memory, not L2."""
    import torch.nn.functional as F

    from efficientml.llm.kernels import triton_gemv

    a, m = model.model.layers[0].self_attn, model.model.layers[0].mlp
    shapes = {"qkv": a.packed.weight if getattr(a.packed, "weight", None) is not None else a.q_proj.weight,
              "o": a.o_proj.weight,
              "gate_up": m.packed.weight if getattr(m.packed, "weight", None) is not None else m.gate_proj.weight,
              "down": m.down_proj.weight, "lm_head": model.lm_head.weight}
    out = {}
    for name, w0 in shapes.items():
        ws = [torch.randn_like(w0) for _ in range(4)]
        x = torch.randn(1, w0.shape[1], device=w0.device, dtype=w0.dtype)
        row = {"shape": list(w0.shape), "mb": w0.numel() * w0.element_size() / 1e6}
        for who, fn in (("cublas", lambda w: F.linear(x, w)), ("triton", lambda w: triton_gemv.gemv(x, w))):
            for w in ws:
                fn(w)
            ts = []
            for i in range(iters):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn(ws[i % 4])
                e.record()
                e.synchronize()
                ts.append(s.elapsed_time(e) / 1e3)
            t = statistics.median(ts)
            row[f"{who}_us"] = t * 1e6
            row[f"{who}_gbs"] = w0.numel() * w0.element_size() / t / 1e9
        out[name] = row
        del ws
    return out


class _Done(Exception):
    """Ends a section early (light mode) without an error."""


def _hf_random(cfg, dev: str):
    """transformers' Llama with the same shapes (random weights, bf16, on ``dev``)."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM as HFLlama

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            hf = HFLlama(HFConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"}))
    finally:
        torch.set_default_dtype(old)
    return hf.to(dev, torch.bfloat16).eval()


def gpu_targets(rec: BenchmarkRecord) -> None:
    """The two GPU targets from whatever variants were measured: the best batch-1 variant (CUDA graph,
    or torch.compile inside the graph) against the measured read bandwidth of the same run, and against
    transformers' batch-1 generate measured in the same run as that variant."""
    s7 = {k: v for k, v in rec.results.get("llama2_7b_shapes", {}).items() if k.startswith("batch1")}
    if not s7:
        rec.target("gpu_7b_decode_bandwidth_fraction", None, ">=", 0.70, note="7b section not run")
    else:
        k = max(s7, key=lambda k: s7[k]["ours"]["achieved_gbs"] / s7[k]["read_gbs_same_run"])
        v = s7[k]
        dev = {r["run"]: r.get("device") for r in rec.results.get("runs", [])}.get(v.get("run"))
        rec.target("gpu_7b_decode_bandwidth_fraction", v["ours"]["achieved_gbs"] / v["read_gbs_same_run"], ">=",
                   0.70, note=f"bf16 batch-1 decode: bytes/step × tok/s ({v['ours']['decode_tok_s_per_row']:.1f} "
                              f"tok/s, {v['ours']['achieved_gbs']:.0f} GB/s) ÷ measured read bandwidth "
                              f"({v['read_gbs_same_run']:.0f} GB/s), variant {k}{f' on {dev}' if dev else ''}; random weights with "
                              "Llama-2-7B's shapes")
    sm = {k: v for k, v in rec.results.get("smollm2_135m", {}).items() if k.startswith("batch1")}
    theirs = {v.get("run"): v["transformers"] for v in sm.values() if "transformers" in v}
    best = None
    for k, v in sm.items():  # ours ÷ transformers from the same run
        t = theirs.get(v.get("run"))
        if t is not None:
            r = v["ours"]["decode_tok_s_per_row"] / t["decode_tok_s_per_row"]
            if best is None or r > best[0]:
                best = (r, k, v["ours"]["decode_tok_s_per_row"], t["decode_tok_s_per_row"])
    if best is None:
        rec.target("gpu_smollm2_decode_speedup_vs_transformers", None, ">=", 10.0, note="smollm2 section not run")
    else:
        rec.target("gpu_smollm2_decode_speedup_vs_transformers", best[0], ">=", 10.0,
                   note=f"bf16 batch-1 greedy decode, ours {best[2]:.0f} tok/s (variant {best[1]}) ÷ transformers "
                        f"generate {best[3]:.1f} tok/s, same weights, same GPU, same run")


GPU_SECTIONS = ("llama2_7b_shapes", "smollm2_135m")


def _gpu_run_rows(d: dict, f: str, base: int) -> dict:
    """One GPU JSON as a record whose rows and runs are numbered from ``base``: a plain run becomes
    run ``base`` (its bandwidth copied onto its rows); an earlier merge keeps its runs, shifted."""
    res = d["results"]
    merged = "runs" in res
    if merged:
        runs, bw = [dict(r, run=r["run"] + base) for r in res["runs"]], None
    else:
        runs = [{"run": base, "file": Path(f).name, "created": d["created"], "git_commit": d["git_commit"],
                 "command": d["command"], "device": d["machine"].get("device"), "bandwidth": res.get("bandwidth")}]
        bw = res.get("bandwidth", {}).get("read_gbs")
    out: dict = {"runs": runs}
    for sec in GPU_SECTIONS:
        for k, v in res.get(sec, {}).items():
            if isinstance(v, dict):
                v = dict(v, run=v.get("run", 0) + base) if merged else dict(v, run=base)
                if bw is not None:
                    v.setdefault("read_gbs_same_run", bw)
            elif not merged:
                k = f"{k} (run {base})"
            out.setdefault(sec, {})[k] = v
    for k, v in res.items():  # anything else (software, ppl_cuda, …): later files win
        if k not in GPU_SECTIONS and k not in ("runs", "bandwidth", "commands"):
            out[k] = v
    return dict(d, results=out, targets=[])


def merge_gpu(files: list[str], out: Path) -> None:
    """Fold several GPU runs' JSONs (sections run in separate calls) into one llm_core_gpu.json; each
    row records which run it came from, later files win per row. A file that is itself a merge (the
    committed llm_core_gpu.json) keeps its runs, renumbered after the ones before it, so a new GPU
    session adds to it: ``--merge-gpu benchmarks/results/llm_core_gpu.json NEW.json``."""
    from efficientml.core.serialization import write_json

    docs = []
    for f in files:
        d = read_record(f)
        docs.append(_gpu_run_rows(d, f, sum(len(x["results"]["runs"]) for x in docs)))
    rec = merge_records(docs, "llm_core_gpu")  # rows one level deep per section, runs concatenated
    runs = rec.results["runs"]
    rec.results = {k: v for k, v in rec.results.items() if k != "runs"} | {"runs": runs}
    gpu_targets(rec)
    doc = rec.to_dict()
    doc.update(machine=docs[-1]["machine"], created=runs[-1]["created"], git_commit=runs[-1]["git_commit"],
               command="python benchmarks/llm_core.py --merge-gpu " + " ".join(Path(f).name for f in files))
    write_json(out, doc)


@torch.inference_mode()
def part_gpu(quick: bool, sections: list[str], out: Path, light: bool = False) -> None:
    """bf16 decode on CUDA, section by section (``7b``: random weights with Llama-2-7B's shapes;
    ``smollm2``: the real SmolLM2-135M). Sections run separately accumulate into ``out``."""
    rec = BenchmarkRecord("llm_core_gpu", device="cuda" if torch.cuda.is_available() else None)
    if out.is_file():
        old = json.loads(out.read_text())
        rec.results = old.get("results", {})
    if not torch.cuda.is_available():
        why = "no CUDA device on the machine that ran this; run `python benchmarks/llm_core.py --part gpu` on a GPU"
        rec.target("gpu_7b_decode_bandwidth_fraction", None, ">=", 0.70, note=why)
        rec.target("gpu_smollm2_decode_speedup_vs_transformers", None, ">=", 10.0, note=why)
        rec.write(out)
        return
    import transformers

    from efficientml.llm.config import LlamaConfig
    from efficientml.llm.io.load import load, save_hf
    from efficientml.llm.kernels import triton_gemv
    from efficientml.llm.kernels.decode import use_gpu_gemv
    from efficientml.llm.kernels.packed import pack_projections
    from efficientml.llm.model import build_model

    dev = "cuda"
    reps = 2 if quick else 3
    if "bandwidth" not in rec.results:
        rec.results["bandwidth"] = read_bandwidth_gbs(dev, mb=4096)
        log(f"bandwidth {rec.results['bandwidth']}")
    rec.results["software"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                               "gpu": torch.cuda.get_device_name()}
    bw = rec.results["bandwidth"]["read_gbs"]

    def save() -> None:
        for sec in ("llama2_7b_shapes", "smollm2_135m"):  # each row keeps the bandwidth of its own run
            for row in rec.results.get(sec, {}).values():
                if isinstance(row, dict):
                    row.setdefault("read_gbs_same_run", bw)
        rec.targets = []
        gpu_targets(rec)
        rec.write(out)

    if "7b" in sections:
        cfg7 = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                           tie_word_embeddings=False)
        model = pack_projections(build_model(cfg7, device=dev, dtype=torch.bfloat16))
        res = rec.results.setdefault("llama2_7b_shapes", {})
        n = 64 if quick else 256
        try:
            res["batch1"] = _decode_rates(model, None, 1, 128, n, n, reps)
            log(f"7b batch1 graph: {res['batch1']}")
            save()
            if not quick:
                res["batch1_compile"] = _decode_rates(model, None, 1, 128, n, n, reps, use_compile=True)
                log(f"7b batch1 compile: {res['batch1_compile']}")
                save()

            def attempt(key: str, fn) -> None:  # a failed experiment is recorded, the section goes on
                try:
                    res[key] = fn()
                    log(f"7b {key}: {res[key]}")
                except Exception as e:
                    res[f"error ({key})"] = f"{type(e).__name__}: {e}"
                    log(f"7b {key} failed: {res[f'error ({key})']}")
                save()

            attempt("profile_batch1_graph", lambda: profile_decode_step(model))
            if use_gpu_gemv(model):  # the Triton matrix-vector kernel instead of cuBLAS at M = 1
                attempt("gemv_shapes", lambda: gpu_gemv_shapes(model))
                attempt("batch1_triton_gemv", lambda: _decode_rates(model, None, 1, 128, n, n, reps))
                attempt("profile_batch1_graph_triton_gemv", lambda: profile_decode_step(model))
                if not quick:
                    attempt("batch1_compile_triton_gemv",
                            lambda: _decode_rates(model, None, 1, 128, n, n, reps, use_compile=True))
                res["triton_gemv_configs"] = triton_gemv.tuned()
                use_gpu_gemv(model, enable=False)
                save()
            if not quick:  # inductor's own tuning, gpt-fast style: pointwise/reduction kernels, then M = 1 GEMMs
                def inductor(**options):
                    def run() -> dict:
                        import torch._inductor.config as inductor_config

                        torch._dynamo.reset()  # dynamo does not guard on inductor's config: compile afresh
                        with inductor_config.patch(**options):
                            row = _decode_rates(model, None, 1, 128, n, n, reps, use_compile=True)
                        torch._dynamo.reset()
                        return {**row, "inductor_options": options}
                    return run

                attempt("batch1_compile_coordinate_descent", inductor(coordinate_descent_tuning=True))
                attempt("batch1_compile_max_autotune_gemm",
                        inductor(coordinate_descent_tuning=True, max_autotune_gemm=True))
            if light:
                raise _Done
            res["batch16"] = _decode_rates(model, None, 16, 128, n, n, reps)
            log(f"7b batch16 graph: {res['batch16']}")
            save()
            hf = _hf_random(cfg7, dev)
            for B in ((1,) if light else (1, 16)):  # transformers at ~10 tok/s: fewer tokens and one repeat
                r = _decode_rates(model, hf, B, 128, n, 32, 1)
                res[f"batch{B}"]["transformers"] = r["transformers"]
                res[f"batch{B}"]["speedup"] = (res[f"batch{B}"]["ours"]["decode_tok_s_per_row"]
                                               / r["transformers"]["decode_tok_s_per_row"])
                log(f"7b batch{B} transformers: {r['transformers']}")
                save()
            del hf
            torch.cuda.empty_cache()
        except _Done:
            pass
        except Exception as e:  # keep what was measured
            res["error"] = f"{type(e).__name__}: {e}"
            log(f"7b section failed: {res['error']}")
            save()
        del model
        torch.cuda.empty_cache()

    if "smollm2" in sections:
        res = rec.results.setdefault("smollm2_135m", {})
        try:
            try:
                model, _ = load("smollm2-135m", dtype=torch.bfloat16, device=dev)
                res["weights"] = "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to bf16"
            except Exception as e:  # e.g. the GGUF could not be copied to this machine: same shapes
                log(f"smollm2 weights unavailable ({e}); random weights with SmolLM2-135M's shapes")
                model = pack_projections(build_model(LlamaConfig(tie_word_embeddings=True, rope_theta=100000.0),
                                                     device=dev, dtype=torch.bfloat16))
                res["weights"] = f"random, SmolLM2-135M's shapes (real weights unavailable: {e})"
            tmp = Path(tempfile.mkdtemp(prefix="llm_core_gpu_"))
            save_hf(model, None, tmp / "hf")
            from transformers import LlamaForCausalLM as HFLlama

            hf = HFLlama.from_pretrained(str(tmp / "hf"), dtype=torch.bfloat16).to(dev).eval()
            n = 64 if quick else 256
            for B in ((1,) if light else (1, 16)):
                res[f"batch{B}"] = _decode_rates(model, hf, B, 128, n, 64 if quick else 128, reps)
                log(f"smollm2 batch{B}: {res[f'batch{B}']}")
                save()
            if not quick:
                res["batch1_compile"] = _decode_rates(model, None, 1, 128, n, n, reps, use_compile=True)
                log(f"smollm2 batch1 compile: {res['batch1_compile']}")
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
            log(f"smollm2 section failed: {res['error']}")
    save()
    log(f"wrote {out}")


# the parts in the order they run; each is a function of the Run below
PARTS = {
    "ppl": lambda r: part_ppl(r.rec, r.args.quick, Path(r.args.progress) if r.args.progress else None,
                              r.args.stop_after, device=r.args.device),
    "decode": lambda r: part_decode(r.rec, r.args.quick, r.args.new_tokens, r.args.repeats),
    "decode-batch": lambda r: part_decode_batch(r.rec, r.args.quick, r.args.new_tokens, r.args.repeats),
    "gpu": lambda r: part_gpu(r.args.quick, r.args.gpu_sections.split(","), r.gpu_out, r.args.gpu_light),
}


class Run:
    def __init__(self, args: argparse.Namespace, rec: BenchmarkRecord, out: Path, gpu_out: Path):
        self.args, self.rec, self.out, self.gpu_out = args, rec, out, gpu_out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_part_options(ap, PARTS, merge=False, out=False)
    ap.add_argument("--part", choices=[*PARTS, "all"], default=None, help="one part (the older spelling of --parts)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--progress", default=None, help="ppl: save/resume window sums in this JSON file")
    ap.add_argument("--stop-after", type=float, default=None, help="ppl: stop after this many seconds")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode: tokens generated per run")
    ap.add_argument("--repeats", type=int, default=3, help="decode: interleaved repeats (median)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/llm_core.json (quick: a temp file)")
    ap.add_argument("--device", default="cpu", help="ppl: run both implementations on this device (cpu, cuda)")
    ap.add_argument("--gpu-sections", default="7b,smollm2", help="gpu: comma-separated sections (7b, smollm2)")
    ap.add_argument("--gpu-light", action="store_true", help="gpu: batch 1 only (no batch 16; 7b without transformers' row)")
    ap.add_argument("--merge-gpu", nargs="+", default=None, metavar="JSON",
                    help="merge GPU runs' JSONs (sections run separately) into --gpu-out")
    ap.add_argument("--gpu-out", default=None, help="gpu: default benchmarks/results/llm_core_gpu.json (quick: a temp file)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gpu_out = default_out("llm_core_gpu", args.quick, args.gpu_out)
    if args.merge_gpu:
        merge_gpu(args.merge_gpu, default_out("llm_core_gpu", False, args.gpu_out))
        return 0
    out = default_out("llm_core", args.quick, args.out)
    rec = BenchmarkRecord("llm_core")
    if out.is_file():  # parts run separately accumulate into one file
        old = read_record(out)
        rec.results, rec.targets = old.get("results", {}), old.get("targets", [])

    def done(name: str, seconds: float) -> None:
        if name != "gpu":  # the gpu part writes its own record (llm_core_gpu.json)
            rec.results.setdefault("commands", {})[name] = rec.command
            rec.write(out)  # after each part, so a long run keeps what it finished

    run_parts(PARTS, selected_parts(PARTS, args.parts, args.part), Run(args, rec, out, gpu_out), after=done)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
