"""``efficientml llm serve MODEL`` — an OpenAI-compatible HTTP server (efficientml.llm.serve.openai_api).

Authentication: ``--api-key`` (or the ``EFFICIENTML_API_KEY`` environment variable, which keeps the key
out of the process list) makes every ``/v1/*`` route require ``Authorization: Bearer <key>``.
A ``--host`` other than a loopback address needs a key, or ``--no-auth`` to serve without one on
purpose. ``/health`` and ``/metrics`` stay open (a load balancer and Prometheus read them).
"""

from __future__ import annotations

import argparse
import errno
import functools
import ipaddress
import os
import socket
import sys
from typing import Callable

from efficientml.cli.common import positive_int
from efficientml.core.errors import ConfigError


def register(s: argparse._SubParsersAction, model_args: Callable, load: Callable) -> None:
    """``model_args(parser)`` adds MODEL, --dtype, --device, --threads; ``load(args)`` → (model, tokenizer)
    (both from :mod:`efficientml.cli.llm`, as `llm generate` uses them)."""
    q = s.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)",
                     description="Serve the model over HTTP with OpenAI's API on the continuous-batching engine "
                                 "(paged KV cache, prefix caching). SIGTERM or Ctrl-C: stop accepting, finish "
                                 "the requests in flight, exit. A --host other than loopback needs --api-key "
                                 "(or --no-auth); /health and /metrics need no key.")
    model_args(q)
    q.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    q.add_argument("--port", type=_port, default=8000)
    q.add_argument("--api-key", default=os.environ.get("EFFICIENTML_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $EFFICIENTML_API_KEY)")
    q.add_argument("--no-auth", action="store_true", help="serve a non-loopback --host without an API key")
    q.add_argument("--served-model-name", default=None, help="the name clients pass as 'model' (default: MODEL)")
    q.add_argument("--max-num-seqs", type=positive_int, default=64, help="sequences batched per step")
    q.add_argument("--max-num-batched-tokens", type=positive_int, default=512, help="tokens per step (prefill chunks)")
    q.add_argument("--max-queue", type=positive_int, default=256,
                   help="requests waiting for their first token before new ones get 429 (default 256)")
    q.add_argument("--kv-cache-mb", type=positive_int, default=256, help="KV-cache pool size in MiB")
    q.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV block")
    q.add_argument("--max-model-len", type=positive_int, default=None, help="context limit (default: the model's)")
    q.add_argument("--no-prefix-caching", action="store_true", help="do not share KV blocks of common prefixes")
    q.add_argument("--drain-timeout", type=positive_int, default=30, help="seconds to finish requests at shutdown")
    q.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info")
    q.set_defaults(func=functools.partial(run_serve, load=load))


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 0-65535, got {text!r}")
    return v


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so a busy port fails in one line, at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host!r} is not an address this machine can listen on ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is already in use; stop what listens there or pass "
                              "another --port") from None
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _check_auth(args: argparse.Namespace) -> None:
    if args.api_key is not None and not args.api_key.strip():
        raise ConfigError("--api-key is empty; give a key, or leave it out on a loopback --host")
    if args.api_key and args.no_auth:
        raise ConfigError("--api-key and --no-auth contradict each other; give one")
    if not _is_loopback(args.host) and not args.api_key and not args.no_auth:
        raise ConfigError(f"--host {args.host} is reachable from other machines: give --api-key KEY (or set "
                          "EFFICIENTML_API_KEY), or --no-auth to serve without one on purpose")


def run_serve(args: argparse.Namespace, load: Callable) -> int:
    from efficientml.core.lazy import optional_import

    _check_auth(args)
    for mod in ("fastapi", "uvicorn", "prometheus_client"):
        optional_import(mod, "serve", "efficientml llm serve")
    sock = bind(args.host, args.port)
    try:
        app = _build_app(args, *load(args))
        from efficientml.llm.serve.openai_api import serve

        host, port = sock.getsockname()[:2]
        print(f"serving {app.state.server.model_name!r} on http://{host}:{port}/v1 "
              f"({'API key required' if args.api_key else 'no API key'})", file=sys.stderr)
        serve(app, sock, log_level=args.log_level, drain_timeout_s=args.drain_timeout)
    finally:
        sock.close()
    return 0


def _build_app(args: argparse.Namespace, model, tok):
    from efficientml.llm.serve import EngineConfig, LLMEngine, SchedulerConfig
    from efficientml.llm.serve.async_engine import AsyncLLMEngine
    from efficientml.llm.serve.openai_api import create_app

    cfg = EngineConfig(block_size=args.block_size, kv_cache_bytes=args.kv_cache_mb << 20,
                       max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching,
                       scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                                 max_num_batched_tokens=args.max_num_batched_tokens))
    engine = AsyncLLMEngine(LLMEngine(model, tok, cfg), max_queue=args.max_queue)
    return create_app(engine, tok, args.served_model_name or args.model, api_key=args.api_key or None,
                      drain_timeout_s=args.drain_timeout)
