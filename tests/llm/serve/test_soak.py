"""The soak of benchmarks/serving.py at CI size: 60 streamed requests on a loopback uvicorn server over a
tiny random model, concurrency 8, 15% of the clients leaving mid-stream (some before their first
token). Every request must end, the server must hold nothing afterwards, and no KV block may leak —
checked both through /metrics (what the benchmark reads) and on the engine itself."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
pytest.importorskip("httpx")
pytest.importorskip("tokenizers")

from efficientml.llm.serve import EngineConfig, LLMEngine, SchedulerConfig  # noqa: E402
from efficientml.llm.serve.async_engine import AsyncLLMEngine  # noqa: E402

from ..conftest import tiny_model  # noqa: E402
from .test_openai_api import byte_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
NAME = "tiny"


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _SlowStep:
    """The engine's step with a 3 ms pause: a tiny model's step is far quicker than a client reads a
    chunk, and the disconnects must land while their requests still run."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine, self.step = engine, engine.step

    def __call__(self):
        time.sleep(0.003)
        return self.step()


@pytest.fixture(scope="module")
def server():
    from efficientml.llm.serve.openai_api import create_app

    client = _bench("serving_client")
    tok = byte_tokenizer()
    # 48 blocks × 16 tokens: 8 sequences of ≤ 40 tokens use ≤ 24; preemption never needed, leaks would show
    engine = LLMEngine(tiny_model(vocab_size=260, max_position_embeddings=128), tok,
                       EngineConfig(num_blocks=48, cpu_kernels=False, scheduler=SchedulerConfig(max_num_seqs=8)))
    engine.step = _SlowStep(engine)
    aengine = AsyncLLMEngine(engine, max_queue=64)
    with client.InProcessServer(create_app(aengine, tok, NAME, drain_timeout_s=5)) as url:
        yield url, engine, aengine


def test_soak_every_request_ends_and_no_block_leaks(server):
    url, engine, aengine = server
    soak = _bench("serving_soak")
    prompts = [[(7 * i + j) % 256 for j in range(8 + i % 17)] for i in range(12)]  # 8–24 tokens
    rep = soak.run_soak(url, prompts, n=60, concurrency=8, tokens=(4, 16), disconnect_frac=0.15, seed=3,
                        model=NAME, grace_s=10.0)
    assert rep["requests"] == 60 and rep["accepted"] == 60
    assert rep["disconnect_planned"] == 9 and rep["disconnected"] == 9  # ceil(0.15 · 60), all carried out
    assert rep["completed"] == 60 - 9  # every other stream reached [DONE] with a finish reason
    assert rep["client_lost"] == 0 and rep["server_held_after"] == 0 and rep["lost"] == 0, rep["errors"]
    assert rep["leaked_blocks"] == 0
    assert rep["server_finished"] + rep["server_aborted"] == 60
    assert rep["server_aborted"] >= 1  # some disconnects did stop a running request
    assert rep["disconnected_before_first_token"] == 3  # every third disconnect leaves before any text
    # the engine agrees with /metrics: nothing queued, running, remembered or holding a block
    assert engine.blocks.num_used_blocks == 0 and not engine.has_unfinished() and not engine.requests
    assert aengine.num_in_flight() == 0


def test_soak_plan_is_seeded_and_exact():
    soak = _bench("serving_soak")
    a = soak.soak_plan(40, [[1, 2, 3]], (4, 16), 0.1, seed=5, model=NAME)
    b = soak.soak_plan(40, [[1, 2, 3]], (4, 16), 0.1, seed=5, model=NAME)
    assert a == b
    bodies, stops = a
    assert sum(s is not None for s in stops) == 4
    assert all(4 <= body["max_tokens"] <= 16 and body["ignore_eos"] and body["stream"] for body in bodies)
    assert all(0 <= s < bodies[i]["max_tokens"] for i, s in enumerate(stops) if s is not None)
    assert sorted(s == 0 for s in stops if s is not None) == [False, False, True, True]
