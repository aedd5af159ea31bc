"""The soak of benchmarks/serving.py (and of tests/llm/serve/test_soak.py): many streamed requests on
loopback at bounded concurrency, a seeded share of them leaving mid-stream, then the server's own
count of what ended and what it still holds.

Each request asks for a random ``max_tokens`` in ``tokens`` (``ignore_eos``); a disconnecting one
closes its connection after a random number of chunks with text, 1 to ``max_tokens`` − 1, or (every
third of them) right after the response headers, while it is queued or in prefill. A request **ends** when its client saw
the whole stream (status 200, a finish reason, ``[DONE]``) or left on purpose. After the run (and a
grace period for the server to notice the last disconnects) ``/metrics`` must show nothing waiting,
running or pending and 0 KV blocks in use:

- ``lost`` = clients that neither completed nor left on purpose (errors, cut streams) + requests the
  server still holds;
- ``leaked_blocks`` = KV blocks in use with no request in flight;
- ``aborted`` = accepted − finished (the server's ``efficientml_request_success_total``): the
  disconnects the engine stopped before their end (the rest had finished first).
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serving_client import ended_cleanly, new_client, run_bounded, server_gauges  # noqa: E402


def soak_plan(n: int, prompts: list[list[int]], tokens: tuple[int, int], disconnect_frac: float, seed: int,
              model: str) -> tuple[list[dict], list[int | None]]:
    """(bodies, stop_after): exactly ceil(``disconnect_frac`` · n) requests disconnect, chosen by ``seed``."""
    rng = random.Random(seed)
    bodies, stops = [], [None] * n
    for i in range(n):
        bodies.append({"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": rng.randint(*tokens),
                       "temperature": 0.0, "ignore_eos": True, "stream": True})
    for k, i in enumerate(rng.sample(range(n), math.ceil(disconnect_frac * n))):
        stops[i] = 0 if k % 3 == 0 else rng.randint(1, bodies[i]["max_tokens"] - 1)
    return bodies, stops


def _quiet(url: str, headers: dict | None, grace_s: float) -> dict[str, float]:
    """The server's gauges once nothing is in flight (or after ``grace_s``)."""
    end = time.monotonic() + grace_s
    while True:
        g = server_gauges(url, headers)
        busy = g.get("waiting", 0) + g.get("running", 0) + g.get("pending", 0)
        if (busy == 0 and g.get("blocks_used", 0) == 0) or time.monotonic() > end:
            return g
        time.sleep(0.1)


def run_soak(url: str, prompts: list[list[int]], n: int, concurrency: int, tokens: tuple[int, int] = (4, 16),
             disconnect_frac: float = 0.15, seed: int = 0, model: str = "smollm2-135m",
             headers: dict | None = None, grace_s: float = 30.0) -> dict[str, Any]:
    """Run the soak against the server at ``url``; its report (see the module docstring)."""
    before = server_gauges(url, headers)["finished"]
    bodies, stops = soak_plan(n, prompts, tokens, disconnect_frac, seed, model)

    async def go():
        async with new_client(url, concurrency, headers) as client:
            return await run_bounded(client, bodies, concurrency, stops)

    outcomes, wall = asyncio.run(go())
    g = _quiet(url, headers, grace_s)
    left = [r for r in outcomes if r["disconnected"]]
    unended_clients = [i for i, r in enumerate(outcomes) if not ended_cleanly(r)]
    held = int(g.get("waiting", 0) + g.get("running", 0) + g.get("pending", 0))
    accepted = sum(1 for r in outcomes if r["status"] == 200)
    finished = int(g["finished"] - before)
    return {"requests": n, "concurrency": concurrency, "max_tokens_range": list(tokens), "wall_s": wall,
            "disconnect_planned": sum(s is not None for s in stops), "disconnected": len(left),
            "disconnected_before_first_token": sum(1 for r in left if r["chunks"] == 0),
            "completed": sum(1 for r in outcomes if r["done"]), "accepted": accepted,
            "server_finished": finished, "server_aborted": accepted - finished, "server_held_after": held,
            "client_lost": len(unended_clients), "lost": len(unended_clients) + held,
            "leaked_blocks": int(g.get("blocks_used", 0)),
            "errors": sorted({str(outcomes[i]["error"]) for i in unended_clients})[:5]}
