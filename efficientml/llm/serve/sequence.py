"""One generated sequence and the sampling parameters of its request.

A :class:`Sequence` is the unit the scheduler and block manager move around: its token ids (prompt
then output), how many of them already have keys/values in the KV pool (``num_computed_tokens``; the
rest are computed by the next steps, a prefill chunk or one decode token at a time), its block
table, and its status::

    WAITING --admitted (blocks allocated)--> RUNNING --stop / length / abort--> FINISHED
       ^                                         |
       +------ preempted (blocks freed, recomputed later) ---+

A request with ``n > 1`` forks into ``n`` sequences once its prompt is computed: they share the
prompt's blocks (reference counts) and diverge from the first sampled token on.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from efficientml.core.errors import ConfigError
from efficientml.llm.generate import SamplingConfig


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SamplingParams:
    """Per request, in vLLM's / OpenAI's names. Sampling itself is :func:`efficientml.llm.generate.sample`
    (the same order: repetition penalty, temperature, top-k, top-p, min-p, multinomial).

    ``logprobs``: None off; 0 the sampled token's log-probability; k > 0 also the k most likely tokens'.
    ``seed``: each of the ``n`` sequences draws from its own generator seeded ``seed + index``, so a
    request's output does not depend on what else is in the batch."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (need the engine's tokenizer); not part of the output text
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.n < 1:
            raise ConfigError(f"n (sequences per request) must be at least 1, got {self.n}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ConfigError(f"logprobs must be None or ≥ 0 (top alternatives), got {self.logprobs}")
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be at least 1, got {self.max_tokens}")
        self.config  # validates the sampling fields (SamplingConfig's checks)

    @property
    def config(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, stop_token_ids=self.stop_token_ids, seed=self.seed,
                              repetition_penalty=self.repetition_penalty, min_p=self.min_p,
                              stop_strings=self.stop)


_ids = itertools.count()


@dataclass
class Sequence:
    token_ids: list[int]  # the prompt, then the output as it is sampled (append_token)
    params: SamplingParams
    request_id: str = ""
    index: int = 0  # which of the request's n sequences
    seq_id: int = field(default_factory=lambda: next(_ids))
    num_prompt_tokens: int = -1  # -1: all of token_ids at creation
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of the full, computed blocks, in order
    num_computed_tokens: int = 0  # tokens whose keys/values are in the pool
    num_cached_tokens: int = 0  # of those, found in the prefix cache at the last admission
    num_preemptions: int = 0
    forked: bool = False  # n > 1: the request's other sequences have been forked from this one
    output_text: str = ""
    output_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    generator: torch.Generator | None = None
    stream: object | None = None  # a TextStream when the engine has a tokenizer

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model: the rest of the prompt (prefill), or the last sampled one."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def fork(self, index: int) -> "Sequence":
        """A sibling with the same tokens and computed state; the block manager shares the blocks."""
        return Sequence(list(self.token_ids), self.params, self.request_id, index,
                        num_prompt_tokens=self.num_prompt_tokens, status=self.status,
                        block_hashes=list(self.block_hashes), num_computed_tokens=self.num_computed_tokens,
                        num_cached_tokens=self.num_cached_tokens, forked=True, arrival_time=self.arrival_time)
