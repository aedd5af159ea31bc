"""The engine behind a server: one thread owns the :class:`~.engine.LLMEngine`, asyncio handlers talk to it.

    aengine = AsyncLLMEngine(LLMEngine(model, tok), max_queue=64)
    aengine.start()                               # the step thread
    async for out in aengine.generate(ids, SamplingParams(max_tokens=32)):
        send(out.outputs[0].new_text)             # RequestOutput as each step produces it
    aengine.shutdown()                            # finishes what runs, then stops the thread

Handlers never touch the engine: :meth:`generate` puts an ``add`` command on a thread-safe inbox and
reads the request's own ``asyncio.Queue``, which the thread fills through ``loop.call_soon_threadsafe``.
The thread drains the inbox, runs :meth:`LLMEngine.step` while anything is unfinished, and sleeps on
the inbox when idle. Leaving the ``async for`` early (a client that disconnected, a cancelled task)
sends ``abort``: the thread frees the request's KV blocks before its next step.

Admission control: at most ``max_queue`` requests may be *pending* (submitted, no token yet: in the
inbox, waiting in the scheduler or in prefill); one more raises :class:`QueueFullError` (a server
answers 429). After :meth:`drain`, new requests raise :class:`EngineClosedError` (503) while the
running ones finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator, Sequence as Seq

from efficientml.core.errors import ConfigError, EfficientMLError
from efficientml.llm.serve.engine import LLMEngine
from efficientml.llm.serve.request import RequestOutput
from efficientml.llm.serve.sequence import SamplingParams


class QueueFullError(EfficientMLError):
    """Too many requests are waiting for their first token; retry later (HTTP 429)."""


class EngineClosedError(EfficientMLError):
    """The engine is draining or stopped and takes no new requests (HTTP 503)."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # one per RequestGroup: its requests' outputs, or the error that ended them

    def put(self, item: object) -> bool:
        """Hand ``item`` to the reader's loop; False when that loop has closed (nobody is reading)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # "Event loop is closed"
            return False
        return True


class AsyncLLMEngine:
    """``on_output(out, itl_s)``, if given, runs on the engine thread for every output (metrics); ``itl_s``
    is the time since the request's previous output, None for its first."""

    def __init__(self, engine: LLMEngine, max_queue: int = 128,
                 on_output: Callable[[RequestOutput, float | None], None] | None = None) -> None:
        if max_queue < 1:
            raise ConfigError(f"max_queue must be at least 1, got {max_queue}")
        self.engine, self.max_queue, self.on_output = engine, max_queue, on_output
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._last_out: dict[str, float] = {}  # engine thread only: when each request's last output came
        self._lock = threading.Lock()  # guards _pending, _closed, and every engine call (stats() readers too)
        self._pending: set[str] = set()
        self._closed = False
        self._stop = threading.Event()
        self._gate = threading.Lock()  # held by the thread while it handles commands and steps (paused())
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._stats = engine.stats()
        self.error: BaseException | None = None  # what stopped the thread, if anything did

    # ---- lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="efficientml-engine", daemon=True)
            self._thread.start()

    def drain(self) -> None:
        """Take no new requests; those already in keep running."""
        with self._lock:
            self._closed = True

    def shutdown(self, timeout_s: float | None = None) -> None:
        """Drain, wait up to ``timeout_s`` for the running requests to end, abort the rest, stop the thread."""
        self.drain()
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while self._thread is not None and self._thread.is_alive() and self.num_in_flight():
            if end is not None and time.monotonic() > end:
                break
            time.sleep(0.01)
        self._stop.set()
        self._inbox.put(("wake", None, None))
        if self._thread is not None:
            self._thread.join(timeout=10)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No command handled and no step run until the block exits (a maintenance window, a test
        holding requests in the queue); submissions still count against ``max_queue``."""
        with self._gate:
            yield

    @property
    def accepting(self) -> bool:
        """The thread is alive and new requests are taken (not draining)."""
        return self._thread is not None and self._thread.is_alive() and not self._closed

    def num_in_flight(self) -> int:
        with self._lock:
            return self._stats["waiting"] + self._stats["running"] + len(self._pending)

    def stats(self) -> dict:
        """The engine's :meth:`LLMEngine.stats` as of its last step, plus ``pending`` (no token yet)."""
        with self._lock:
            return {**self._stats, "pending": len(self._pending)}

    # ---- requests (from the event loop)
    def submit(self, prompts: Seq[str | Seq[int]], params: SamplingParams) -> "RequestGroup":
        """Queue ``prompts`` (all or none: :class:`QueueFullError` when they would pass ``max_queue``,
        :class:`EngineClosedError` while draining); iterate the group for their outputs."""
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())
        rids = [f"areq-{next(self._ids)}" for _ in prompts]
        with self._lock:
            if self._closed or self._stop.is_set():
                raise EngineClosedError("the server is shutting down and takes no new requests")
            if len(self._pending) + len(rids) > self.max_queue:
                raise QueueFullError(f"{len(self._pending)} requests are already waiting for their first token "
                                     f"(the limit is {self.max_queue}); retry later")
            self._pending.update(rids)
        for rid, prompt in zip(rids, prompts):
            self._inbox.put(("add", rid, (prompt, params, stream)))
        return RequestGroup(self, rids, stream)

    async def generate(self, prompt: str | Seq[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """One request's outputs as the engine produces them; the last has ``finished``."""
        async for out in self.submit([prompt], params):
            yield out

    def abort(self, request_id: str) -> None:
        """Ask the engine thread to stop ``request_id`` and free its blocks (before its next step)."""
        self._inbox.put(("abort", request_id, None))

    # ---- the engine thread
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    busy = self.engine.has_unfinished()
                try:
                    cmd = self._inbox.get_nowait() if busy else self._inbox.get(timeout=0.5)
                except queue.Empty:
                    cmd = None
                with self._gate:
                    while cmd is not None:
                        self._handle(*cmd)
                        try:
                            cmd = self._inbox.get_nowait()
                        except queue.Empty:
                            cmd = None
                    self._step()
        except BaseException as e:  # noqa: BLE001 — reported to every waiting handler, never lost
            self.error = e
            self._fail_all(e)
            raise
        finally:
            with self._lock:
                self._closed = True
            self._fail_all(EngineClosedError("the engine stopped"))

    def _handle(self, kind: str, rid: str, payload) -> None:
        if kind == "add":
            prompt, params, stream = payload
            try:
                with self._lock:
                    self.engine.add_request(prompt, params, request_id=rid)
            except EfficientMLError as e:
                with self._lock:
                    self._pending.discard(rid)
                stream.put(e)
                return
            self._streams[rid] = stream
        elif kind == "abort" and rid in self._streams:
            with self._lock:
                self.engine.abort(rid)
                self._pending.discard(rid)
                self.engine.pop_finished()
                self._stats = self.engine.stats()
            del self._streams[rid]
            self._last_out.pop(rid, None)

    def _step(self) -> None:
        with self._lock:
            if not self.engine.has_unfinished():
                return
            outs = self.engine.step()
            for out in outs:
                self._pending.discard(out.request_id)
            if any(o.finished for o in outs):
                self.engine.pop_finished()
            self._stats = self.engine.stats()
        now = time.perf_counter()
        orphans = []
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            last = self._last_out.get(out.request_id)
            if self.on_output is not None:
                self.on_output(out, None if last is None else now - last)
            self._last_out[out.request_id] = now
            if out.finished:
                del self._streams[out.request_id], self._last_out[out.request_id]
            if not stream.put(out) and not out.finished:
                orphans.append(out.request_id)
        for rid in orphans:  # their reader's event loop is gone: free their blocks now
            self._handle("abort", rid, None)

    def _fail_all(self, error: BaseException) -> None:
        for rid, stream in list(self._streams.items()):
            stream.put(error)
        self._streams.clear()
        self._last_out.clear()
        with self._lock:
            self._pending.clear()


class RequestGroup:
    """The requests of one :meth:`AsyncLLMEngine.submit`: ``async for out in group`` yields their outputs
    (interleaved, each tagged by ``request_id``) until all have finished; an engine error (a prompt that
    does not fit, …) is raised there. Leaving the loop early, or :meth:`abort`, aborts the unfinished."""

    def __init__(self, engine: AsyncLLMEngine, request_ids: list[str], stream: _Stream) -> None:
        self.engine, self.request_ids, self._stream = engine, request_ids, stream
        self._open = set(request_ids)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while self._open:
                item = await self._stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    self._open.discard(item.request_id)
                yield item
        finally:
            self.abort()

    def abort(self) -> None:
        for rid in self._open:
            self.engine.abort(rid)
        self._open.clear()
