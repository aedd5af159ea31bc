"""The serving engine: paged KV cache, continuous batching, prefix caching (:mod:`.engine`)."""

from efficientml.llm.serve.engine import EngineConfig, LLMEngine
from efficientml.llm.serve.metrics import RequestMetrics, RunMetrics
from efficientml.llm.serve.request import CompletionOutput, RequestOutput
from efficientml.llm.serve.scheduler import SchedulerConfig
from efficientml.llm.serve.sequence import SamplingParams, Sequence, SequenceStatus

__all__ = ["CompletionOutput", "EngineConfig", "LLMEngine", "RequestMetrics", "RequestOutput", "RunMetrics",
           "SamplingParams", "SchedulerConfig", "Sequence", "SequenceStatus"]
