"""Speculative decoding part of the serving benchmark (issue #18): ``PARTS = {"speculative": ...}`` for
benchmarks/serving.py, and runnable alone.

SmolLM2-135M target (bf16 or fp32, whichever the plain engine decodes faster here; both recorded),
batch 1, greedy, ``ignore_eos``, a few prompts, 128 new tokens each (``--quick``: 16, and k in {2, 4}).
The plain engine against the same engine with speculation by (a) n-gram prompt lookup (shortest matched
suffix 1, 2 or 3 tokens: a longer minimum proposes less often but better) and (b) a packed W4 copy of the
target (RTN, symmetric, groups of 32) as the draft, k in {2, 3, 4, 6}: output tok/s,
acceptance rate, mean accepted length, and whether every output is token-identical to plain decoding.
Targets: ``speculative_speedup_bs1`` (best over methods and k) ≥ 1.5, ``speculative_greedy_identical``.

    python benchmarks/serving_spec.py --quick --out /tmp/serving_spec_quick.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from efficientml.analysis.record import BenchmarkRecord, add_part_options, default_out, log, run_parts, selected_parts

PROMPTS = (
    "Repeat the following list exactly, twice.\nList: apples, pears, plums, cherries, grapes, lemons, limes, figs.\n"
    "First time: apples, pears,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\ndef factorial(n):\n",
    "Once upon a time, in a small village at the edge of a forest, there lived a",
)


def _budget(quick: bool) -> dict:
    return {"new_tokens": 16, "ks": (2, 4)} if quick else {"new_tokens": 128, "ks": (2, 3, 4, 6)}


def _run(model, tok, ids, n, spec=None) -> dict:
    """One engine over the prompts one at a time (batch 1): tok/s after a warm-up, outputs, acceptance."""
    from efficientml.llm.serve import EngineConfig, LLMEngine, SamplingParams

    eng = LLMEngine(model, tok, EngineConfig(speculative=spec))
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    eng.generate([ids[0]], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up (kernels, allocator)
    outs, wall, tokens, prop, acc, ver = [], 0.0, 0, 0, 0, 0
    for p in ids:
        t0 = time.perf_counter()
        out = eng.generate([p], params)[0]
        wall += time.perf_counter() - t0
        outs.append(list(out.outputs[0].token_ids))
        tokens += len(outs[-1])
        r = eng.last_run
        prop, acc, ver = prop + r.spec_proposed, acc + r.spec_accepted, ver + r.spec_verifications
    leak = eng.blocks.num_used_blocks + (eng.spec.proposer.num_used_blocks() if eng.spec is not None else 0)
    return {"tok_s": tokens / wall, "outputs": outs, "acceptance_rate": acc / prop if prop else None,
            "mean_accepted_length": acc / ver if ver else None, "proposed": prop, "leaked_blocks": leak}


def _w4_draft(model):
    from efficientml import apply
    from efficientml.llm.compress import RTNConfig

    draft = copy.deepcopy(model)
    apply(draft, RTNConfig(4, 32, symmetric=True), inplace=True, pack=True, progress=False)
    return draft


def part_speculative(r) -> None:
    from efficientml.llm.io.load import load
    from efficientml.llm.serve import SpeculativeConfig

    b = _budget(r.quick)
    n = b["new_tokens"]
    base, tok = load("smollm2-135m")
    ids = [tok.encode(p) for p in PROMPTS]
    plain = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        m = copy.deepcopy(base).to(dtype)
        plain[name] = (m, _run(m, tok, ids, n))
        log(f"plain {name}: {plain[name][1]['tok_s']:.1f} tok/s")
    dname = max(plain, key=lambda k: plain[k][1]["tok_s"])
    target, ref = plain[dname]
    draft = _w4_draft(base.to(torch.float32))
    rows, identical = [], True
    for method, nmin in (("ngram", 1), ("ngram", 2), ("ngram", 3), ("draft", None)):
        name = f"ngram_min{nmin}" if method == "ngram" else "draft_w4_rtn_g32"
        for k in b["ks"]:
            spec = SpeculativeConfig(method, k, draft_model=draft if method == "draft" else None, ngram_min=nmin or 1)
            res = _run(target, tok, ids, n, spec)
            same = res["outputs"] == ref["outputs"]
            identical &= same
            rows.append({"method": name, "k": k, "ngram_min": nmin,
                         "tok_s": res["tok_s"], "speedup": res["tok_s"] / ref["tok_s"],
                         "acceptance_rate": res["acceptance_rate"], "mean_accepted_length": res["mean_accepted_length"],
                         "identical_to_plain": same, "leaked_blocks": res["leaked_blocks"]})
            log(f"{name} k={k}: {res['tok_s']:.1f} tok/s ({rows[-1]['speedup']:.2f}x), "
                f"acceptance {res['acceptance_rate']}, identical {same}")
    best = max(rows, key=lambda x: x["speedup"])
    r.rec.results["speculative"] = {
        "target_dtype": dname, "plain_tok_s": {k: v[1]["tok_s"] for k, v in plain.items()},
        "new_tokens": n, "prompts": len(ids), "batch": 1, "threads": torch.get_num_threads(),
        "rows": rows, "best": {"method": best["method"], "k": best["k"]}}
    r.rec.target("speculative_speedup_bs1", best["speedup"], ">=", 1.5,
                 note=f"best: {best['method']} k={best['k']}, {dname} target, output tok/s vs the plain engine")
    r.rec.target("speculative_greedy_identical", identical, "==", True,
                 note="every speculative output token-identical to the plain engine's greedy output")


PARTS = {"speculative": part_speculative}


class Run:
    def __init__(self, args: argparse.Namespace, rec: BenchmarkRecord) -> None:
        self.quick, self.rec = args.quick, rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_part_options(ap, PARTS, merge=False)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = default_out("serving_spec", args.quick, args.out)
    rec = BenchmarkRecord("serving")
    run_parts(PARTS, selected_parts(PARTS, args.parts), Run(args, rec), after=lambda name, s: rec.write(out))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
