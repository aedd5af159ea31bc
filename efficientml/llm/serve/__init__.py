"""The serving engine: paged KV cache, continuous batching, prefix caching (:mod:`.engine`), its asyncio
wrapper (:mod:`.async_engine`) and the OpenAI-compatible HTTP server (:mod:`.openai_api`, needs the
``serve`` extra: ``create_app`` is imported on use)."""

from efficientml.llm.serve.async_engine import AsyncLLMEngine
from efficientml.llm.serve.engine import EngineConfig, LLMEngine
from efficientml.llm.serve.metrics import RequestMetrics, RunMetrics
from efficientml.llm.serve.request import CompletionOutput, RequestOutput
from efficientml.llm.serve.scheduler import SchedulerConfig
from efficientml.llm.serve.sequence import SamplingParams, Sequence, SequenceStatus

__all__ = ["AsyncLLMEngine", "CompletionOutput", "EngineConfig", "LLMEngine", "RequestMetrics", "RequestOutput", "RunMetrics",
           "SamplingParams", "SchedulerConfig", "Sequence", "SequenceStatus"]
