"""The OpenAI-compatible server on a real uvicorn (loopback, a free port, in a thread), driven by the
official ``openai`` client and by raw HTTP: outputs equal generate(), SSE framing, every 400 case,
429 on a full queue, a disconnect frees the blocks, /metrics, /v1/models, the API key."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
tokenizers = pytest.importorskip("tokenizers")

from efficientml.llm.generate import SamplingConfig, generate  # noqa: E402
from efficientml.llm.io.tokenizer import Tokenizer  # noqa: E402
from efficientml.llm.serve import EngineConfig, LLMEngine, SamplingParams, SchedulerConfig  # noqa: E402
from efficientml.llm.serve.async_engine import AsyncLLMEngine  # noqa: E402

from ..conftest import tiny_model  # noqa: E402

KEY = "sk-test"
NAME = "tiny"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE without merges (one token per byte) + ChatML specials: ids 0-255 bytes, 256-258 special."""
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    return Tokenizer(backend, bos_token=None, eos_token="<|im_end|>", chat_template=CHATML)


def _model(**kw):
    return tiny_model(vocab_size=260, max_position_embeddings=128, **kw)


class _Running:
    def __init__(self, max_queue: int = 8, num_blocks: int = 64):
        import uvicorn

        from efficientml.llm.serve.openai_api import create_app

        self.tok = byte_tokenizer()
        self.engine = LLMEngine(_model(), self.tok, EngineConfig(num_blocks=num_blocks, cpu_kernels=False,
                                                                scheduler=SchedulerConfig(max_num_seqs=8)))
        self.aengine = AsyncLLMEngine(self.engine, max_queue=max_queue)
        self.app = create_app(self.aengine, self.tok, NAME, api_key=KEY, drain_timeout_s=5)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                break
            time.sleep(0.01)
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)

    def stop(self):
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def srv():
    s = _Running()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)


def _reference(tok, ids, n):
    """generate() alone on the same weights: the independent reference (stops at the EOS, as the engine)."""
    model = _model()
    stops = (tok.eos_id, *model.config.eos_token_ids)  # the server stops at both, as `llm generate` does
    res = generate(model, ids, SamplingConfig(max_new_tokens=n, stop_token_ids=stops), tokenizer=tok)
    return res.tokens[0], res.texts[0]


def _events(text: str) -> list:
    """The SSE stream's data lines, each parsed (the last is the literal [DONE])."""
    assert text.endswith("data: [DONE]\n\n")
    blocks = [b for b in text.split("\n\n") if b]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks)
    return [json.loads(b[6:]) if b != "data: [DONE]" else "[DONE]" for b in blocks]


def test_completions_equal_generate(srv, client):
    prompt = "The quick brown fox"
    toks, text = _reference(srv.tok, srv.tok.encode(prompt), 24)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == text
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(toks)
    assert r.choices[0].finish_reason == ("stop" if toks[-1] == srv.tok.eos_id else "length")
    eng = LLMEngine(_model(), srv.tok, EngineConfig(num_blocks=32, cpu_kernels=False))
    two = eng.generate(["ab", "cde"], SamplingParams(max_tokens=10))
    r2 = client.completions.create(model=NAME, prompt=["ab", "cde"], max_tokens=10, temperature=0, n=2)
    assert [c.index for c in r2.choices] == [0, 1, 2, 3]
    assert [c.text for c in r2.choices] == [two[0].outputs[0].text] * 2 + [two[1].outputs[0].text] * 2
    ids = srv.tok.encode("hello")
    r3 = client.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0, logprobs=2)
    lp = r3.choices[0].logprobs
    assert r3.choices[0].text == _reference(srv.tok, ids, 8)[1] and len(lp.token_logprobs) == r3.usage.completion_tokens
    assert all(len(t) == 2 and max(t.values()) >= v - 1e-6 for t, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_stream_sse_format_and_text(srv, client):
    prompt = "stream me"
    _, text = _reference(srv.tok, srv.tok.encode(prompt), 20)
    r = srv.http.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 20, "temperature": 0,
                                               "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    ev = _events(r.text)
    assert ev[-1] == "[DONE]" and ev[-2]["choices"] == [] and ev[-2]["usage"]["prompt_tokens"] == len(prompt)
    chunks = ev[:-2]
    assert all(c["object"] == "text_completion" and c["usage"] is None and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    got = "".join(c.choices[0].text for c in client.completions.create(model=NAME, prompt=prompt, max_tokens=20,
                                                                       temperature=0, stream=True))
    assert got == text


def test_chat_completions_use_the_template(srv, client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    ids = srv.tok.encode(srv.tok.apply_chat_template(msgs))
    toks, text = _reference(srv.tok, ids, 16)
    r = client.chat.completions.create(model=NAME, messages=msgs, max_completion_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text and r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(toks)
    parts = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
    assert parts[0].choices[0].delta.role == "assistant" and parts[-1].usage.completion_tokens == len(toks)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == text
    assert [p.choices[0].finish_reason for p in parts if p.choices][-1] in ("stop", "length")
    raw = srv.http.post("/v1/chat/completions", json={"model": NAME, "messages": msgs, "max_tokens": 16,
                                                      "temperature": 0, "stream": True})
    ev = _events(raw.text)
    assert ev[-1] == "[DONE]" and all(e["object"] == "chat.completion.chunk" for e in ev[:-1])
    assert ev[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert ev[-2]["choices"][0]["delta"] == {} and ev[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(e["choices"][0]["finish_reason"] is None for e in ev[:-2])
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in ev[:-1]) == text
    lp = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=4, temperature=0, logprobs=True,
                                        top_logprobs=3).choices[0].logprobs.content
    assert len(lp) == 4 and all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in lp)


BAD = [
    ({"model": NAME, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": NAME, "prompt": "x", "max_tokens": 1000}, "max_tokens"),
    ({"model": NAME, "prompt": "x" * 200, "max_tokens": 1}, "prompt"),
    ({"model": NAME, "prompt": ""}, "prompt"),
    ({"model": NAME, "prompt": []}, "prompt"),
    ({"model": "gpt-9", "prompt": "x"}, "model"),
    ({"model": NAME, "prompt": "x", "bogus": 1}, "bogus"),
    ({"model": NAME, "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"model": NAME, "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": NAME, "prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"model": NAME, "prompt": "x", "frequency_penalty": 1.0}, "frequency_penalty"),
    ({"model": NAME, "prompt": [5, 9999]}, "prompt"),
    ({"prompt": "x"}, "model"),
    ({"model": NAME, "prompt": [[5, 6], []]}, "prompt"),
    ({"model": NAME, "prompt": "x", "echo": True}, "echo"),
    ({"model": NAME, "prompt": "x", "best_of": 3}, "best_of"),
    ({"model": NAME, "prompt": "x", "logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"model": NAME, "prompt": "x", "n": 1.5}, "n"),
    ({"model": NAME, "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": NAME, "prompt": "x", "temperature": 3.0}, "temperature"),
    ({"model": NAME, "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
]


@pytest.mark.parametrize("body,param", BAD)
def test_bad_completion_requests_get_400(srv, body, param):
    r = srv.http.post("/v1/completions", json=body)
    err = r.json()["error"]
    assert r.status_code == 400 and set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"] and (err["param"] or "").startswith(param)


def test_bad_chat_requests_and_malformed_json_get_400(srv):
    for body, param in [({"model": NAME, "messages": []}, "messages"),
                        ({"model": NAME, "messages": [{"role": "user"}]}, "messages"),
                        ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "tools": []}, "tools"),
                        ({"model": NAME, "messages": [{"role": "user", "content": "x"}],
                          "max_completion_tokens": -1}, "max_completion_tokens")]:
        r = srv.http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith(param), r.text
    r = srv.http.post("/v1/completions", content=b'{"model": "tiny", "prompt": ', headers={"content-type":
                                                                                          "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_seeded_sampling_repeats_and_n_streams_each_choice(srv, client):
    kw = dict(model=NAME, prompt="seeded", max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a, b = (client.completions.create(**kw).choices[0].text for _ in range(2))
    c = client.completions.create(**{**kw, "seed": 8}).choices[0].text
    assert a == b and a != c
    msgs = [{"role": "user", "content": "two answers"}]
    parts = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=6, temperature=1.0, seed=3,
                                                n=2, stream=True))
    whole = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=6, temperature=1.0, seed=3, n=2)
    for i in range(2):
        mine = [p.choices[0] for p in parts if p.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason in ("stop", "length")
        assert "".join(d.delta.content or "" for d in mine) == whole.choices[i].message.content


def test_unknown_route_and_non_stream_disconnect(srv):
    r = srv.http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    body = {"model": NAME, "prompt": "leave early", "max_tokens": 100, "ignore_eos": True, "temperature": 0}
    with srv.aengine.paused():
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                       timeout=0.5)  # the client gives up while the request is queued
        time.sleep(0.2)
        steps = srv.engine.num_steps
    for _ in range(300):
        if srv.aengine.stats()["blocks_used"] == 0 and not srv.engine.has_unfinished() and not srv.engine.requests:
            break
        time.sleep(0.01)
    assert srv.engine.blocks.num_used_blocks == 0 and not srv.engine.requests
    assert srv.engine.num_steps - steps <= 1


def test_requests_past_the_kv_pool_get_400():
    """A pool of 2 blocks × 16 tokens: no sequence may pass 32 tokens (checked before queueing)."""
    from efficientml.llm.serve.openai_api import create_app

    tok = byte_tokenizer()
    eng = AsyncLLMEngine(LLMEngine(_model(), tok, EngineConfig(num_blocks=2, cpu_kernels=False)))
    app = create_app(eng, tok, NAME)

    eng.start()
    try:
        too_long, fits, prompt_too_long = _asgi(app, [
            ("/v1/completions", {"model": NAME, "prompt": "x" * 20, "max_tokens": 20}),
            ("/v1/completions", {"model": NAME, "prompt": "x" * 20, "max_tokens": 12}),
            ("/v1/completions", {"model": NAME, "prompt": "x" * 40})])
    finally:
        eng.shutdown(5)
    assert too_long.status_code == 400 and "at most 12" in too_long.json()["error"]["message"]
    assert too_long.json()["error"]["param"] == "max_tokens" and fits.status_code == 200
    assert fits.json()["usage"]["completion_tokens"] <= 12
    assert prompt_too_long.status_code == 400 and prompt_too_long.json()["error"]["param"] == "prompt"


def _asgi(app, requests):
    """Run ``requests`` ((path, body) pairs) through ``app`` in-process; the responses."""
    import asyncio

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return [await c.post(path, json=body) for path, body in requests]

    return asyncio.run(go())


def test_the_models_own_stop_ids_end_a_completion():
    """config.json's eos_token_id (here not the tokenizer's EOS) ends a completion, unless ignore_eos."""
    from efficientml.llm.serve.openai_api import create_app

    tok = byte_tokenizer()
    ids = tok.encode("stop ids")
    free = generate(_model(), ids, SamplingConfig(max_new_tokens=12), tokenizer=tok).tokens[0]
    stop = free[3]
    eng = AsyncLLMEngine(LLMEngine(_model(eos_token_id=stop), tok, EngineConfig(num_blocks=16, cpu_kernels=False)))
    eng.start()
    try:
        body = {"model": NAME, "prompt": ids, "max_tokens": 12, "temperature": 0}
        cut, whole = _asgi(create_app(eng, tok, NAME), [("/v1/completions", body),
                                                         ("/v1/completions", {**body, "ignore_eos": True})])
    finally:
        eng.shutdown(5)
    assert cut.json()["usage"]["completion_tokens"] == free.index(stop) + 1
    assert cut.json()["choices"][0]["finish_reason"] == "stop"
    assert whole.json()["usage"]["completion_tokens"] == 12 and whole.json()["choices"][0]["finish_reason"] == "length"


def test_server_module_says_which_extra_is_missing():
    import subprocess
    import sys

    code = ("import sys; sys.modules['fastapi'] = None\n"
            "import efficientml.llm.serve, efficientml.llm.serve.async_engine\n"
            "try:\n    import efficientml.llm.serve.openai_api\n"
            "except Exception as e:\n    print(type(e).__name__, e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "UnsupportedError" in out and "efficientml[serve]" in out


def test_models_health_and_api_key(srv):
    m = srv.http.get("/v1/models").json()
    assert m["object"] == "list" and [d["id"] for d in m["data"]] == [NAME] and m["data"][0]["max_model_len"] == 128
    assert srv.http.get("/health").json() == {"status": "ok"}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(srv.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(srv.url + "/health").status_code == 200  # open without a key


def test_metrics_series(srv, client):
    client.completions.create(model=NAME, prompt="metrics", max_tokens=5, temperature=0)
    text = srv.http.get("/metrics").text
    for name in ("time_to_first_token_seconds_bucket", "time_per_output_token_seconds_count",
                 "inter_token_latency_seconds_count", "e2e_request_latency_seconds_sum",
                 "generation_tokens_total", "prompt_tokens_total", "num_requests_waiting", "num_requests_running",
                 "kv_blocks_used", "kv_blocks_free", "prefix_cache_hit_rate", "request_success_total"):
        assert f"efficientml_{name}" in text, name
    free = float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith("efficientml_kv_blocks_free ")))
    assert free == srv.engine.blocks.num_free_blocks == 64  # nothing running: every block free


def test_full_queue_gets_429(srv):
    srv.aengine.max_queue = 2
    body = {"model": NAME, "prompt": "queued", "max_tokens": 4, "temperature": 0}
    try:
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c1:
            held = [c1.stream("POST", "/v1/completions", json={**body, "stream": True}) for _ in range(2)]
            with srv.aengine.paused():  # nothing leaves the queue while paused
                resp = [h.__enter__() for h in held]
                assert all(r.status_code == 200 for r in resp)
                assert srv.aengine.stats()["pending"] == 2
                r = srv.http.post("/v1/completions", json=body)
                assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
                assert r.json()["error"]["code"] == "queue_full"
            texts = ["".join(r.iter_text()) for r in resp]
            for h in held:
                h.__exit__(None, None, None)
        got = ["".join(e["choices"][0]["text"] for e in _events(t)[:-1]) for t in texts]
        assert got[0] == got[1] == _reference(srv.tok, srv.tok.encode("queued"), 4)[1]
    finally:
        srv.aengine.max_queue = 8


def test_disconnect_mid_stream_frees_blocks(srv, monkeypatch):
    body = {"model": NAME, "prompt": "a long story", "max_tokens": 100, "temperature": 0.0, "ignore_eos": True,
            "stream": True}
    step = srv.engine.step

    def slow_step():  # a tiny model's 100 steps can all run before the client reads its first line
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(srv.engine, "step", slow_step)
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            with srv.aengine.paused():  # the client leaves while the engine holds: the abort comes first
                steps = srv.engine.num_steps
                assert srv.engine.blocks.num_used_blocks > 0 and srv.engine.has_unfinished()
                r.close()
                c.close()
                time.sleep(0.3)
    for _ in range(300):
        if srv.aengine.stats()["blocks_used"] == 0 and not srv.engine.has_unfinished():
            break
        time.sleep(0.01)
    assert srv.aengine.stats()["blocks_used"] == 0 and srv.engine.blocks.num_used_blocks == 0
    assert srv.engine.num_steps - steps <= 1  # aborted at once, not run on to its 100 tokens
    assert not srv.engine.requests  # forgotten, not leaked


def test_cli_serves_and_drains_on_sigterm(tmp_path):
    """`efficientml llm serve DIR` in a subprocess: a stream in flight at SIGTERM still ends with [DONE],
    and the process exits."""
    import os
    import signal
    import subprocess
    import sys

    from efficientml.llm.io.load import save_hf

    save_hf(_model(), byte_tokenizer(), tmp_path / "m")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "efficientml.cli.main", "llm", "serve", str(tmp_path / "m"),
                             "--port", str(port), "--served-model-name", NAME, "--kv-cache-mb", "4",
                             "--log-level", "warning"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        body = {"model": NAME, "prompt": "drain", "max_tokens": 100, "ignore_eos": True, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = "\n".join(lines)
        assert rest.rstrip().endswith("data: [DONE]")
        n = 1 + sum(1 for ln in rest.splitlines() if ln.startswith("data: {"))
        assert n == 100  # every token of the request in flight came, one per event
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.parametrize("argv,match", [
    (["--host", "0.0.0.0"], "reachable from other machines: give --api-key"),
    (["--host", "0.0.0.0", "--api-key", "k", "--no-auth"], "contradict"),
    (["--api-key", " "], "--api-key is empty"),
    (["--port", "70000"], "expected a TCP port 0-65535"),
    (["--max-num-seqs", "0"], "expected a positive integer"),
    (["--host", "no.such.host.invalid", "--no-auth"], "is not an address this machine can listen on"),
    (["--port", "BUSY"], "is already in use"),
])
def test_cli_bad_flags_and_busy_port_exit_2(argv, match, capsys, tmp_path):
    """Refused before any model loads (the model path does not even exist)."""
    from efficientml.cli.main import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        argv = [str(busy.getsockname()[1]) if a == "BUSY" else a for a in argv]
        try:
            rc = main(["llm", "serve", str(tmp_path / "no-model"), *argv])
        except SystemExit as e:
            rc = e.code
    assert rc == 2 and match in capsys.readouterr().err
