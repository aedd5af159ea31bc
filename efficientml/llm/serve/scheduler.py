"""Which sequences run in the next step, and how many of their tokens.

One step is one forward over a ragged batch: each scheduled sequence contributes its next tokens —
a chunk of its prompt (prefill) or its one last sampled token (decode) — under two budgets,
``max_num_batched_tokens`` tokens and ``max_num_seqs`` sequences.

Policies (``SchedulerConfig.policy``):

- ``"continuous"`` (Orca / vLLM): sequences join and leave at every step. Running sequences go
  first — decodes, then unfinished prefill chunks (Sarathi's order: a long prompt never holds up
  the tokens being streamed), oldest first — and the leftover token budget admits waiting
  sequences in arrival order (FCFS). With ``chunked_prefill`` a long prompt is split over
  steps, so it never stalls the running decodes for long.
- ``"static"``: a batch (up to ``max_num_seqs``) is admitted only when nothing is running, and runs
  until every member has finished (as ``generate`` over a fixed batch does).
- ``"dynamic"``: like static, but a batch starts once ``max_num_seqs`` requests wait or the oldest
  has waited ``batch_timeout_s`` (size-or-timeout, as Triton's dynamic batcher does).

In the static and dynamic policies a sequence preempted mid-batch rejoins with the next batch.

**Preemption by recompute.** When a running sequence needs a block and none is free, the newest
running sequence (by arrival) is preempted: its blocks are freed and it goes back to the front of
the waiting queue, to be recomputed (its prompt and output so far; the prefix cache often still
holds most of it). **No starvation:** admission never skips the head of the queue (a sequence that does not fit
blocks those behind it), and preemption takes the newest first, so the oldest sequence always makes
progress.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from efficientml.core.errors import ConfigError
from efficientml.llm.serve.block_manager import BlockManager
from efficientml.llm.serve.sequence import Sequence, SequenceStatus

POLICIES = ("continuous", "static", "dynamic")


@dataclass(frozen=True)
class SchedulerConfig:
    policy: str = "continuous"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    chunked_prefill: bool = True
    batch_timeout_s: float = 0.05  # "dynamic": the longest the oldest request waits for a fuller batch

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"scheduler policy {self.policy!r} is not one of {POLICIES}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_seqs and max_num_batched_tokens must be ≥ 1, got "
                              f"{self.max_num_seqs}, {self.max_num_batched_tokens}")
        if self.batch_timeout_s < 0:
            raise ConfigError(f"batch_timeout_s must be ≥ 0, got {self.batch_timeout_s}")


@dataclass
class ScheduledBatch:
    items: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens computed this step)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


def _age(seq: Sequence) -> tuple[float, int]:
    """Sort key, oldest first: arrival, then creation (a request's forked sequences after it)."""
    return seq.arrival_time, seq.seq_id


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config, self.blocks = config, blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest last
        self.num_preemptions = 0
        self.admission_log: list[str] = []  # request ids in the order they were first admitted

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.config.max_num_batched_tokens)
        if not batch.preempted and self._may_admit():
            self._admit(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        """Decodes first (one token each: they keep streaming), then unfinished prefill chunks, each
        group oldest first (by arrival: a recomputed sequence keeps its age); a sequence short of
        blocks preempts the newest one not yet scheduled (itself, when it is that one)."""
        scheduled: set[int] = set()
        for seq in sorted(self.running, key=lambda s: (s.num_uncomputed > 1, _age(s))):
            if budget <= 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted for an older one this step
                continue
            n = min(seq.num_uncomputed, budget)
            while seq.status is SequenceStatus.RUNNING and not self.blocks.can_append(seq, n):
                self._preempt(max((s for s in self.running if s.seq_id not in scheduled), key=_age), batch)
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self.blocks.append(seq, n)
            batch.items.append((seq, n))
            scheduled.add(seq.seq_id)
            budget -= n
        return budget

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)  # the newest preempted first ends up behind the older ones
        batch.preempted.append(seq)

    def _may_admit(self) -> bool:
        if not self.waiting:
            return False
        if self.config.policy == "continuous":
            return True
        if self.running:
            return False  # static / dynamic: the running batch finishes first
        if self.config.policy == "static":
            return True
        full = len(self.waiting) >= self.config.max_num_seqs
        return full or time.perf_counter() - self.waiting[0].arrival_time >= self.config.batch_timeout_s

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        # with sequences running, keep a few blocks free for their next tokens (vLLM's watermark):
        # admitting into the last block would only force a preemption at the next step
        reserve = max(1, self.blocks.num_blocks // 100)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq, reserve if self.running else 0):
                break  # FCFS: nobody overtakes the head of the queue
            if not self.config.chunked_prefill and seq.num_tokens - self.blocks.cached_tokens(seq) > budget:
                break  # the whole prompt in one step: wait for a step with room for it
            self.blocks.allocate(seq)
            n = min(seq.num_uncomputed, budget)
            self.waiting.popleft()
            if seq.num_preemptions == 0:
                self.admission_log.append(seq.request_id)
                seq.first_scheduled_time = time.perf_counter()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.blocks.append(seq, n)  # allocation covered every token; this only copies shared blocks
            batch.items.append((seq, n))
            budget -= n

    def finish(self, seq: Sequence) -> None:
        """Drop a finished (or aborted) sequence from the queues and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED

    def insert_after(self, parent: Sequence, children: list[Sequence]) -> None:
        """Forked sequences join the running set (the same arrival as their parent; preempted before it)."""
        at = self.running.index(parent) + 1
        for c in children:
            c.status = SequenceStatus.RUNNING
        self.running[at:at] = children
