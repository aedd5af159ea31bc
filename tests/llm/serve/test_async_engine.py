"""AsyncLLMEngine without HTTP: concurrent requests equal LLMEngine.generate, errors reach the caller,
drain refuses new work but finishes the running, the pending bound."""

from __future__ import annotations

import asyncio
import time

import pytest

from efficientml.core.errors import ShapeError
from efficientml.llm.serve import EngineConfig, LLMEngine, SamplingParams
from efficientml.llm.serve.async_engine import AsyncLLMEngine, EngineClosedError, QueueFullError

from ..conftest import tiny_model


def _engine():
    return LLMEngine(tiny_model(max_position_embeddings=128), None, EngineConfig(num_blocks=32, cpu_kernels=False))


PROMPTS = [[5, 9, 12], [7] * 20, [3, 4, 5, 6, 7, 8]]
PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


def test_concurrent_requests_equal_offline_generate_and_drain():
    ref = [o.outputs[0].token_ids for o in _engine().generate(PROMPTS, PARAMS)]
    aeng = AsyncLLMEngine(_engine(), max_queue=8)
    aeng.start()

    async def one(p):
        toks = []
        async for out in aeng.generate(p, PARAMS):
            toks.extend(out.outputs[0].new_token_ids)
        return tuple(toks), out.outputs[0].token_ids

    async def go():
        got = await asyncio.gather(*(one(p) for p in PROMPTS))
        with pytest.raises(ShapeError, match="prompt token ids must be in"):
            async for _ in aeng.generate([10_000], PARAMS):
                pass
        running = asyncio.ensure_future(one(PROMPTS[0]))
        await asyncio.sleep(0.01)
        aeng.drain()
        with pytest.raises(EngineClosedError):
            aeng.submit([PROMPTS[1]], PARAMS)
        return got, await running

    try:
        got, after_drain = asyncio.run(go())
    finally:
        aeng.shutdown(5)
    assert [streamed for streamed, _ in got] == [final for _, final in got] == ref
    assert after_drain[1] == ref[0]  # the request running at drain time finished whole
    assert aeng.stats()["blocks_used"] == 0 and not aeng._thread.is_alive()


def test_pending_bound_is_all_or_nothing():
    aeng = AsyncLLMEngine(_engine(), max_queue=2)

    async def go():
        with aeng.paused():
            aeng.start()
            g = aeng.submit(PROMPTS[:2], PARAMS)
            with pytest.raises(QueueFullError, match="limit is 2"):
                aeng.submit(PROMPTS[2:], PARAMS)
            assert aeng.stats()["pending"] == 2
        return [o async for o in g]

    try:
        outs = asyncio.run(go())
    finally:
        aeng.shutdown(5)
    assert sum(o.finished for o in outs) == 2 and aeng.stats()["pending"] == 0


def test_a_reader_whose_loop_closed_is_aborted():
    """A request left behind by a finished asyncio.run: the engine thread frees it instead of dying."""
    aeng = AsyncLLMEngine(_engine())
    aeng.start()

    async def leave():
        aeng.submit([PROMPTS[1]], SamplingParams(max_tokens=60, ignore_eos=True))  # never read

    try:
        asyncio.run(leave())
        for _ in range(300):
            if not aeng.engine.requests and aeng.stats()["blocks_used"] == 0:
                break
            time.sleep(0.01)
        assert not aeng.engine.requests and aeng.stats()["blocks_used"] == 0 and aeng._thread.is_alive()
        assert aeng.engine.num_steps < 60  # aborted, not run to its end
    finally:
        aeng.shutdown(5)
