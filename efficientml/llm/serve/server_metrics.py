"""Prometheus series of the HTTP server (``GET /metrics``), on a registry of its own.

Histograms, observed as requests finish (or tokens arrive, for inter-token latency):
``efficientml_time_to_first_token_seconds``, ``efficientml_time_per_output_token_seconds`` (TPOT per
request), ``efficientml_inter_token_latency_seconds`` (ITL, every gap between a request's outputs),
``efficientml_e2e_request_latency_seconds``. Counters: ``efficientml_prompt_tokens_total``,
``efficientml_generation_tokens_total`` (tokens/s is its rate), ``efficientml_request_success_total``
by ``finish_reason``. Gauges read from the engine at scrape time: ``efficientml_num_requests_waiting``,
``efficientml_num_requests_running``, ``efficientml_num_requests_pending`` (no token yet),
``efficientml_kv_blocks_used``, ``efficientml_kv_blocks_free``, ``efficientml_kv_cache_usage_ratio``,
``efficientml_prefix_cache_hit_rate``, ``efficientml_prefix_cache_queries`` / ``_hits`` (blocks),
``efficientml_num_preemptions``.
"""

from __future__ import annotations

import math

from efficientml.core.lazy import optional_import
from efficientml.llm.serve.request import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
_GAUGES = {"num_requests_waiting": ("waiting", "requests waiting in the scheduler"),
           "num_requests_running": ("running", "sequences being computed"),
           "num_requests_pending": ("pending", "requests accepted that have no token yet (the bounded queue)"),
           "kv_blocks_used": ("blocks_used", "KV-cache blocks in use"),
           "kv_blocks_free": ("blocks_free", "KV-cache blocks free"),
           "prefix_cache_hit_rate": ("prefix_hit_rate", "fraction of prompt blocks found in the prefix cache"),
           "prefix_cache_queries": ("prefix_queries", "prompt blocks looked up in the prefix cache"),
           "prefix_cache_hits": ("prefix_hits", "prompt blocks found in the prefix cache"),
           "num_preemptions": ("preemptions", "sequences preempted (recomputed) so far")}


class ServerMetrics:
    def __init__(self) -> None:
        pc = optional_import("prometheus_client", "serve", "the /metrics endpoint")
        self._pc = pc
        self.registry = pc.CollectorRegistry()
        r, p = self.registry, "efficientml_"
        self.ttft = pc.Histogram(p + "time_to_first_token_seconds", "arrival to first token", registry=r,
                                 buckets=_LATENCY_BUCKETS)
        self.tpot = pc.Histogram(p + "time_per_output_token_seconds", "per request: (finish - first token) / "
                                 "(output tokens - 1)", registry=r, buckets=_LATENCY_BUCKETS)
        self.itl = pc.Histogram(p + "inter_token_latency_seconds", "gap between a request's consecutive outputs",
                                registry=r, buckets=_LATENCY_BUCKETS)
        self.e2e = pc.Histogram(p + "e2e_request_latency_seconds", "arrival to finish", registry=r,
                                buckets=_LATENCY_BUCKETS)
        self.prompt_tokens = pc.Counter(p + "prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = pc.Counter(p + "generation_tokens", "tokens generated", registry=r)
        self.success = pc.Counter(p + "request_success", "finished requests", ["finish_reason"], registry=r)
        self.gauges = {name: pc.Gauge(p + name, doc, registry=r) for name, (_, doc) in _GAUGES.items()}
        self.usage = pc.Gauge(p + "kv_cache_usage_ratio", "used / total KV blocks", registry=r)

    def on_output(self, out: RequestOutput, itl_s: float | None) -> None:
        """The engine thread's hook (:class:`~.async_engine.AsyncLLMEngine` ``on_output``)."""
        new = sum(len(c.new_token_ids) for c in out.outputs)
        self.generation_tokens.inc(new)
        if itl_s is not None and new:
            self.itl.observe(itl_s)
        if not out.finished:
            return
        m = out.metrics
        for name, hist in (("ttft_s", self.ttft), ("tpot_s", self.tpot), ("latency_s", self.e2e)):
            v = getattr(m, name)
            if not math.isnan(v):
                hist.observe(v)
        self.prompt_tokens.inc(m.num_prompt_tokens)
        for c in out.outputs:
            self.success.labels(c.finish_reason or "unknown").inc()

    def render(self, stats: dict) -> tuple[bytes, str]:
        """(body, content type) of the text exposition format, the gauges set from ``stats`` first."""
        for name, (key, _) in _GAUGES.items():
            self.gauges[name].set(stats.get(key, 0))
        self.usage.set(stats["blocks_used"] / stats["blocks_total"] if stats.get("blocks_total") else 0.0)
        return self._pc.generate_latest(self.registry), self._pc.CONTENT_TYPE_LATEST
