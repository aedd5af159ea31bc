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


def test_latency_table_arithmetic():
    client = _bench("serving_client")
    ok = {**client._outcome(), "status": 200, "done": True, "finish_reason": "length"}
    outs = [{**ok, "ttft_s": 0.1, "latency_s": 1.1, "tokens": 11}, {**ok, "ttft_s": 0.3, "latency_s": 2.3, "tokens": 5},
            {**client._outcome(), "status": 500, "error": "boom", "latency_s": 0.5}]
    t = client.latency_table(outs, wall_s=4.0)
    assert (t["requests"], t["completed"], t["output_tokens"]) == (3, 2, 16)
    assert t["output_tok_s"] == 4.0 and t["requests_per_s"] == 0.5
    assert t["ttft_s"]["median"] == pytest.approx(0.2) and t["ttft_s"]["p99"] == 0.3
    assert t["tpot_s"]["mean"] == pytest.approx((0.1 + 0.5) / 2)  # (1.1 − 0.1) / 10 and (2.3 − 0.3) / 4
    assert t["errors"] == ["boom"]
    assert not client.ended_cleanly(outs[2]) and client.ended_cleanly(outs[0])
    assert not client.ended_cleanly({**ok, "done": False})  # a stream cut before [DONE] is lost


def test_serving_script_records_null_targets_with_reasons(tmp_path):
    bench = _bench("serving")
    assert list(bench.PARTS)[:6] == ["offline", "continuous", "prefix", "llama_server", "online", "soak"]
    assert "speculative" in bench.PARTS and list(bench.PARTS)[-1] == "gpu"
    out = tmp_path / "s.json"
    bench.main(["--quick", "--parts", "gpu", "--out", str(out)])
    st = bench.State(bench.argparse.Namespace(quick=True, out=str(out), dtype="bf16", threads=2, seed=0, repeats=1))
    bench.part_speculative_absent(st)
    import json

    targets = {t["id"]: t for t in json.loads(out.read_text())["targets"]}
    # the second State wrote a fresh record: only its own two targets, each null with its reason
    assert set(targets) == {"speculative_speedup_bs1", "speculative_greedy_identical"}
    assert all(t["value"] is None and t["met"] is False and t["note"] for t in targets.values())
    st.cleanup()
