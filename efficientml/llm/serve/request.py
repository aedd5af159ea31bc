"""A request (one prompt, ``n`` sequences) and what the engine reports about it after each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from efficientml.llm.serve.metrics import RequestMetrics
from efficientml.llm.serve.sequence import SamplingParams, Sequence


@dataclass(frozen=True)
class CompletionOutput:
    index: int  # which of the request's n sequences
    token_ids: tuple[int, ...]  # every output token so far
    new_token_ids: tuple[int, ...]  # those produced by this step
    text: str  # the text so far (stop strings cut, stop tokens out); "" without a tokenizer
    new_text: str  # the text this step released
    logprobs: tuple[float, ...] | None  # per output token, when requested
    top_logprobs: tuple[dict[int, float], ...] | None
    finish_reason: str | None  # None while running; "stop" | "length" | "abort"


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    outputs: tuple[CompletionOutput, ...]  # by index; only the sequences this step touched while running
    finished: bool
    metrics: RequestMetrics


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float
    seqs: list[Sequence] = field(default_factory=list)
    aborted: bool = False  # possibly before all n sequences were forked

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs) and (self.aborted or len(self.seqs) == self.params.n)

    def metrics(self) -> RequestMetrics:
        firsts = [s.first_token_time for s in self.seqs if s.first_token_time is not None]
        ends = [s.finish_time for s in self.seqs if s.finish_time is not None]
        return RequestMetrics(self.arrival_time, min(firsts) if firsts else None,
                              max(ends) if self.finished and ends else None, len(self.prompt_ids),
                              sum(s.num_output_tokens for s in self.seqs),
                              self.seqs[0].num_cached_tokens if self.seqs else 0,
                              sum(s.num_preemptions for s in self.seqs),
                              self.seqs[0].first_scheduled_time if self.seqs else None)

    def output(self, seqs: list[Sequence], new: dict[int, tuple[list[int], str]]) -> RequestOutput:
        """The report for ``seqs`` (of this request); ``new`` maps seq_id → (new ids, new text)."""
        outs = []
        for s in sorted(seqs, key=lambda s: s.index):
            ids, text = new.get(s.seq_id, ([], ""))
            lp = s.params.logprobs is not None
            outs.append(CompletionOutput(s.index, tuple(s.output_ids), tuple(ids), s.output_text, text,
                                         tuple(s.output_logprobs) if lp else None,
                                         tuple(s.top_logprobs) if lp else None, s.finish_reason))
        return RequestOutput(self.request_id, tuple(self.prompt_ids), tuple(outs), self.finished, self.metrics())
