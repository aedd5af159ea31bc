"""An OpenAI-compatible HTTP server over the engine (FastAPI app; :func:`serve` runs it on uvicorn).

    app = create_app(AsyncLLMEngine(LLMEngine(model, tok)), tok, "smollm2-135m", api_key="sk-…")
    serve(app, "127.0.0.1", 8000)

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat template),
``GET /v1/models``, ``GET /health`` (200, or 503 while draining), ``GET /metrics`` (Prometheus, see
:mod:`.server_metrics`). ``stream: true`` answers with server-sent events in OpenAI's chunk format,
ending with ``data: [DONE]``. Errors have OpenAI's body ``{"error": {"message", "type", "param",
"code"}}``: 400 for a bad request (malformed JSON, unknown fields, wrong types, an empty prompt,
``max_tokens`` ≤ 0 or past the context, an unknown model, a parameter left unsupported), 401 for a
missing or wrong API key (``Authorization: Bearer``; only ``/v1/*`` is guarded), 429 when the queue of
requests waiting for their first token is full, 503 while shutting down.

A client that disconnects (mid-stream, or while waiting for a whole response) has its request
aborted: the engine frees its KV blocks before its next step. Needs ``pip install 'efficientml[serve]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
import uuid
from typing import AsyncIterator

from efficientml.core.errors import EfficientMLError
from efficientml.core.lazy import optional_import
from efficientml.llm.serve.async_engine import AsyncLLMEngine, EngineClosedError, QueueFullError
from efficientml.llm.serve.openai_format import DONE, Formatter, sse
from efficientml.llm.serve.server_metrics import ServerMetrics

optional_import("fastapi", "serve", "the OpenAI-compatible server")
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402

from efficientml.llm.serve.protocol import (BadRequest, ChatCompletionRequest, CompletionRequest,  # noqa: E402
                                            error_body)


class _Server:
    """What the routes share: the engine, the tokenizer, the served name, the metrics."""

    def __init__(self, engine: AsyncLLMEngine, tokenizer, model_name: str, api_key: str | None,
                 metrics: ServerMetrics) -> None:
        self.engine, self.tok, self.model_name, self.api_key, self.metrics = engine, tokenizer, model_name, \
            api_key, metrics
        self.max_model_len = engine.engine.max_model_len
        # every id the model ends a turn with (Llama 3: <|eot_id|> and <|end_of_text|>), as `llm generate` stops
        cfg_ids = engine.engine.model.config.eos_token_ids
        self.stop_ids = tuple(sorted({*cfg_ids} - set(engine.engine.eos_ids)))
        self.created = int(time.time())

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise BadRequest(f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                             "model", "model_not_found")

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tok.encode(prompt)
        vocab = self.engine.engine.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise BadRequest(f"prompt token ids must be in [0, {vocab}), got {min(prompt)}…{max(prompt)}", "prompt")
        return list(prompt)

    def max_tokens(self, asked: int | None, lengths: list[int], param: str) -> int:
        """``asked``, checked against the context; None: the rest of the context."""
        longest = max(lengths)
        if asked is not None and asked < 1:
            raise BadRequest(f"'{param}' must be at least 1, got {asked}", param, "invalid_value")
        if longest >= self.max_model_len:
            raise BadRequest(f"the prompt has {longest} tokens; this model's context is {self.max_model_len} "
                             "(the prompt and at least one new token must fit)", "prompt", "context_length_exceeded")
        blocks = self.engine.engine.blocks  # its sizes never change: safe to read off the engine thread
        pool = blocks.num_blocks * blocks.block_size  # tokens one sequence can hold at most
        if asked is None:
            asked = min(self.max_model_len, pool) - longest
        elif longest + asked > self.max_model_len:
            raise BadRequest(f"this model's maximum context length is {self.max_model_len} tokens; the request "
                             f"asks for {longest + asked} ({longest} in the prompt, {asked} in the completion): "
                             f"lower '{param}'", param, "context_length_exceeded")
        if longest >= pool:
            raise BadRequest(f"the prompt's {longest} tokens do not fit the server's KV cache ({pool} tokens with "
                             "one new one)", "prompt", "context_length_exceeded")
        if longest + asked > pool:
            raise BadRequest(f"one sequence of {longest + asked} tokens needs more KV blocks than the server's "
                             f"whole cache holds ({pool} tokens); ask for at most {pool - longest}", param,
                             "context_length_exceeded")
        return asked


def create_app(engine: AsyncLLMEngine, tokenizer, model_name: str, api_key: str | None = None,
               drain_timeout_s: float = 30.0) -> "FastAPI":
    """The FastAPI app; its lifespan starts the engine thread and, at shutdown, drains it (the running
    requests finish, up to ``drain_timeout_s``)."""
    metrics = ServerMetrics()
    engine.on_output = metrics.on_output
    srv = _Server(engine, tokenizer, model_name, api_key, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown, drain_timeout_s)

    app = FastAPI(title="efficientml", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = srv
    _add_errors(app)
    _add_auth(app, srv)
    _add_info_routes(app, srv)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        body.check_supported()
        srv.check_model(body.model)
        prompts = [srv.encode(p) for p in body.prompts()]
        n_tok = srv.max_tokens(body.max_tokens, [len(p) for p in prompts], "max_tokens")
        params = body.sampling(n_tok, body.logprobs, srv.stop_ids)
        return await _respond(srv, request, "completion", prompts, params, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        body.check_supported()
        srv.check_model(body.model)
        if not getattr(srv.tok, "chat_template", None):
            raise BadRequest("this model's tokenizer has no chat template; use /v1/completions", "messages")
        try:
            text = srv.tok.apply_chat_template(body.conversation())
        except EfficientMLError as e:
            raise BadRequest(f"the chat template failed on these messages: {e}", "messages") from None
        ids = srv.encode(text)
        if not ids:
            raise BadRequest("the messages render to an empty prompt", "messages", "empty_prompt")
        n_tok = srv.max_tokens(body.requested_max_tokens, [len(ids)], "max_completion_tokens"
                               if body.max_completion_tokens is not None else "max_tokens")
        top = (body.top_logprobs or 0) if body.logprobs else None
        return await _respond(srv, request, "chat", [ids], body.sampling(n_tok, top, srv.stop_ids), body)

    return app


def _add_info_routes(app: "FastAPI", srv: _Server) -> None:
    @app.get("/health")
    async def health():
        if not srv.engine.accepting:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        body, ctype = srv.metrics.render(srv.engine.stats())
        return Response(body, media_type=ctype)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": srv.model_name, "object": "model", "created": srv.created,
                                            "owned_by": "efficientml", "max_model_len": srv.max_model_len}]}


def _add_errors(app: "FastAPI") -> None:
    @app.exception_handler(BadRequest)
    async def bad_request(_, e: BadRequest):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"msg": "invalid request", "loc": ()}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if err.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        elif err.get("type") == "extra_forbidden":
            msg = f"unknown field {param!r}; see the OpenAI API reference for the fields of this endpoint"
        elif err.get("type") == "missing":
            msg = f"the field {param!r} is required"
        else:
            msg = f"{param or 'the body'}: {err.get('msg', 'invalid')}"
        return JSONResponse(error_body(msg, "invalid_request_error", param, err.get("type")), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(EfficientMLError)
    async def library_error(_, e: EfficientMLError):  # a parameter the engine refuses (SamplingParams' checks)
        return JSONResponse(error_body(str(e), "invalid_request_error"), status_code=400)

    @app.exception_handler(QueueFullError)
    async def queue_full(_, e: QueueFullError):
        return JSONResponse(error_body(str(e), "rate_limit_error", None, "queue_full"), status_code=429)

    @app.exception_handler(EngineClosedError)
    async def closed(_, e: EngineClosedError):
        return JSONResponse(error_body(str(e), "service_unavailable", None, "shutting_down"), status_code=503)


def _add_auth(app: "FastAPI", srv: _Server) -> None:
    if srv.api_key is None:
        return
    want = f"Bearer {srv.api_key}".encode()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            got = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(got, want):
                return JSONResponse(error_body("missing or wrong API key: send 'Authorization: Bearer <key>'",
                                               "invalid_request_error", None, "invalid_api_key"), status_code=401)
        return await call_next(request)


async def _respond(srv: _Server, request: Request, kind: str, prompts: list[list[int]], params, body):
    """Submit (429/503 here, before any byte is sent), then a whole response or an SSE stream."""
    group = srv.engine.submit(prompts, params)
    fmt = Formatter(kind, f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}",
                    int(time.time()), srv.model_name, srv.tok, body.include_usage)
    index = {rid: i * params.n for i, rid in enumerate(group.request_ids)}
    if body.stream:
        return StreamingResponse(_stream(group, fmt, index, kind, sum(map(len, prompts))),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _whole(request, group, fmt, index, sum(map(len, prompts)))


async def _whole(request: Request, group, fmt: Formatter, index: dict[str, int], prompt_tokens: int):
    """Collect every request to its end; a client that leaves meanwhile aborts them."""
    async def collect():
        final = {}
        try:
            async for out in group:
                if out.finished:
                    final[out.request_id] = out
        except EfficientMLError as e:
            raise BadRequest(str(e)) from None
        return final

    task = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(_disconnected(request))
    await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        group.abort()
        return Response(status_code=499)
    gone.cancel()
    final = task.result()
    choices = sorted((index[rid] + c.index, c) for rid, out in final.items() for c in out.outputs)
    return JSONResponse(fmt.response(choices, prompt_tokens))


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body is read already)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _stream(group, fmt: Formatter, index: dict[str, int], kind: str, prompt_tokens: int
                  ) -> AsyncIterator[str]:
    """SSE events; Starlette cancels this generator when the client disconnects, which aborts the group."""
    completion_tokens = 0
    try:
        started: set[int] = set()
        async for out in group:
            for c in out.outputs:
                i = index[out.request_id] + c.index
                if kind == "chat" and i not in started:
                    started.add(i)
                    yield sse(fmt.chunk(i, None))
                completion_tokens += len(c.new_token_ids)
                for chunk in fmt.chunks(i, c):
                    yield sse(chunk)
    except EfficientMLError as e:
        yield sse(error_body(str(e)))
    finally:
        group.abort()
    if fmt.include_usage:
        yield sse(fmt.usage_chunk(prompt_tokens, completion_tokens))
    yield DONE


def serve(app: "FastAPI", sock, log_level: str = "info", drain_timeout_s: float = 30.0) -> None:
    """Run ``app`` on uvicorn over the bound socket ``sock``; SIGTERM/SIGINT: stop accepting, finish the
    open requests (up to ``drain_timeout_s``), then exit."""
    uvicorn = optional_import("uvicorn", "serve", "the OpenAI-compatible server")
    engine = app.state.server.engine

    class _DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            engine.drain()  # new requests on kept-alive connections get 503 from here on
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=drain_timeout_s)
    _DrainingServer(config).run(sockets=[sock])
