"""Prune an LLM to 50% sparsity (Wanda, or 2:4) and measure what it costs in perplexity.

SmolLM2-135M on WikiText-2 (calibration from the validation split, perplexity on the test split):

    python examples/prune_llm.py                      # Wanda, 50% unstructured
    python examples/prune_llm.py --n-m 2:4            # Wanda 2:4 (the pattern sparse tensor cores run)
    python examples/prune_llm.py --method sparsegpt --windows 40

Pruning zeroes weights in the dense matrices (a simulated speedup on CPU; on a GPU, 2:4 weights run
as semi-structured sparse kernels, see efficientml.prune.sparse).
"""

from __future__ import annotations

import argparse

from efficientml.data.text import load_text
from efficientml import apply
from efficientml.llm.compress import CalibConfig, LLMPruneConfig, calibration_tokens
from efficientml.llm.eval import PerplexityProtocol, perplexity
from efficientml.llm.io.load import load


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="model name, HF folder, GGUF file or Hub id")
    ap.add_argument("--method", choices=["wanda", "sparsegpt", "magnitude"], default="wanda")
    ap.add_argument("--n-m", default=None, metavar="N:M", help="N:M structured sparsity, e.g. 2:4")
    ap.add_argument("--calib-samples", type=int, default=16, help="calibration windows")
    ap.add_argument("--context", type=int, default=512, help="tokens per calibration and evaluation window")
    ap.add_argument("--windows", type=int, default=8, help="perplexity windows (the first N of the test text)")
    args = ap.parse_args(argv)

    model, tok = load(args.model)
    ids = tok.encode(load_text("wikitext2-raw-test"), add_bos=False)
    proto = PerplexityProtocol(context=args.context)
    dense = perplexity(model, ids, proto, batch_size=4, max_windows=args.windows).perplexity

    n_m = tuple(int(v) for v in args.n_m.split(":")) if args.n_m else None
    calib = calibration_tokens(tok, CalibConfig("wikitext2-valid", args.calib_samples, args.context, 0))
    report = apply(model, LLMPruneConfig(args.method, 0.5, n_m=n_m), calib=calib, inplace=True, progress=False).report
    sparse = perplexity(model, ids, proto, batch_size=4, max_windows=args.windows).perplexity

    print(f"{args.method} {args.n_m or '50%'}: sparsity {report['sparsity']:.3f}, "
          f"perplexity {dense:.2f} → {sparse:.2f} on {args.windows} windows of {args.context} tokens")
    return {"sparsity": report["sparsity"], "ppl_dense": dense, "ppl_pruned": sparse, "model": model}


if __name__ == "__main__":
    main()
