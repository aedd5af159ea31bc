"""Serving metrics: per request (TTFT, TPOT, end-to-end latency) and per run (throughput, goodput).

- **queue**: arrival → first scheduled (admitted into a step).
- **TTFT** (time to first token): arrival → the first output token is sampled (queueing + prefill).
- **TPOT** (time per output token, a.k.a. mean inter-token latency): (finish − first token) /
  (output tokens − 1); undefined (NaN) for a one-token output.
- **latency**: arrival → finish.
- **throughput**: output (and total) tokens / the run's wall time; **goodput**: requests per second
  that met both a TTFT and a TPOT objective (DistServe's definition).
- **speculative decoding**: the **acceptance rate** (draft tokens kept / proposed) and the **mean
  accepted length** (draft tokens kept per verification; each verification also adds one token of
  the target's, so a sequence advances 1 + that per verified step).

Times are ``time.perf_counter()`` seconds.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    num_preemptions: int = 0
    first_scheduled_time: float | None = None

    @property
    def queue_s(self) -> float:
        return math.nan if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft_s(self) -> float:
        return math.nan if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot_s(self) -> float:
        if self.finish_time is None or self.first_token_time is None or self.num_output_tokens < 2:
            return math.nan
        return (self.finish_time - self.first_token_time) / (self.num_output_tokens - 1)

    @property
    def latency_s(self) -> float:
        return math.nan if self.finish_time is None else self.finish_time - self.arrival_time

    def as_dict(self) -> dict:
        return {**asdict(self), "queue_s": self.queue_s, "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "latency_s": self.latency_s}


@dataclass(frozen=True)
class RunMetrics:
    wall_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    requests: tuple[RequestMetrics, ...] = ()
    spec_proposed: int = 0  # draft tokens proposed (0 without speculative decoding)
    spec_accepted: int = 0  # of those, kept by the acceptance rule
    spec_verifications: int = 0  # (sequence, step) pairs that verified drafts

    @property
    def acceptance_rate(self) -> float:
        return self.spec_accepted / self.spec_proposed if self.spec_proposed else math.nan

    @property
    def mean_accepted_length(self) -> float:
        return self.spec_accepted / self.spec_verifications if self.spec_verifications else math.nan

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else math.nan

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.wall_s if self.wall_s > 0 else math.nan

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.wall_s if self.wall_s > 0 else math.nan

    def goodput(self, ttft_slo_s: float, tpot_slo_s: float) -> float:
        """Requests per second that met both objectives (a one-token output has no TPOT to miss)."""
        ok = sum(1 for r in self.requests if r.ttft_s <= ttft_slo_s and not r.tpot_s > tpot_slo_s)
        return ok / self.wall_s if self.wall_s > 0 else math.nan

    def summary(self) -> dict:
        """Means, medians and p99 of TTFT / TPOT / latency, with the throughputs."""
        out = {"wall_s": self.wall_s, "requests": self.num_requests, "output_tok_s": self.output_tok_s,
               "total_tok_s": self.total_tok_s, "requests_per_s": self.requests_per_s}
        if self.spec_proposed:
            out.update(spec_proposed=self.spec_proposed, spec_accepted=self.spec_accepted,
                       acceptance_rate=self.acceptance_rate, mean_accepted_length=self.mean_accepted_length)
        for name in ("queue_s", "ttft_s", "tpot_s", "latency_s"):
            vals = sorted(v for r in self.requests if not math.isnan(v := getattr(r, name)))
            if vals:
                out[name] = {"mean": statistics.fmean(vals), "median": statistics.median(vals),
                             "p99": vals[min(len(vals) - 1, math.ceil(0.99 * len(vals)) - 1)]}
        return out
