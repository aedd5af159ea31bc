"""The serving engine: paged KV cache, continuous batching, prefix caching, speculative decoding with a
draft model or n-gram lookup (:mod:`.engine`, :mod:`.speculative`), its asyncio
wrapper (:mod:`.async_engine`) and the OpenAI-compatible HTTP server (:mod:`.openai_api`, needs the
``serve`` extra: ``create_app`` is imported on use)."""

from efficientml.llm.serve.async_engine import AsyncLLMEngine
from efficientml.llm.serve.engine import EngineConfig, LLMEngine
from efficientml.llm.serve.metrics import RequestMetrics, RunMetrics
from efficientml.llm.serve.request import CompletionOutput, RequestOutput
from efficientml.llm.serve.scheduler import SchedulerConfig
from efficientml.llm.serve.sequence import SamplingParams, Sequence, SequenceStatus
from efficientml.llm.serve.speculative import SpeculativeConfig

__all__ = ["AsyncLLMEngine", "CompletionOutput", "EngineConfig", "LLMEngine", "RequestMetrics", "RequestOutput", "RunMetrics",
           "SamplingParams", "SchedulerConfig", "Sequence", "SequenceStatus", "SpeculativeConfig"]
