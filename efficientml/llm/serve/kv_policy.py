"""KV-cache policies: which of a sequence's past tokens keep their keys/values.

    KVPolicy.full()                              every token (the default)
    KVPolicy.window(1024)                        each query sees its 1,024 most recent tokens
    KVPolicy.streaming(sinks=4, window=1020)     StreamingLLM (Xiao et al. 2023): the first tokens
                                                 ("attention sinks") kept forever + a recent window,
                                                 positions counted inside the cache
    KVPolicy.h2o(heavy=0.1, recent=0.1)          H2O (Zhang et al. 2023): the tokens with the largest
                                                 accumulated attention + the most recent ones; a float
                                                 is a fraction of the context so far, an int a count;
                                                 score="mean": attention per query since arrival
    KVPolicy.parse("streaming:4,1020")           the same, from a command line

A policy is data; :class:`~efficientml.llm.serve.policy_cache.PolicyKVCache` applies it. After every
step with ``n`` tokens of context a cache keeps :meth:`KVPolicy.keep` of them, evicting by
:meth:`KVPolicy.evict_order` separately in every layer and KV head (H2O's heavy hitters differ per head),
and returns the blocks it no longer needs to the pool.

**Positions inside the cache** (StreamingLLM): once the window slides, a query at cache position
``c = sinks + window - 1`` sees the sinks at distances ``c - s`` rather than their true, ever-growing
distances, which would leave the trained context after 8k tokens. The recent window is contiguous, so
its distances are the true ones; :meth:`KVPolicy.sink_shift` gives how far each query's rotation moves
for the sink keys only (keys stay stored with their own rotation; nothing is re-rotated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from efficientml.core.errors import ConfigError

KINDS = ("full", "window", "streaming", "h2o")


@dataclass(frozen=True)
class KVPolicy:
    kind: str = "full"
    window: int | None = None  # window / streaming: the most recent tokens a query sees, itself included
    sinks: int = 0  # streaming: the first tokens, never evicted
    heavy: float = 0  # h2o: heavy hitters kept; float in (0, 1): a fraction of the context, int: a count
    recent: float = 0  # h2o: most recent tokens kept; same convention
    reposition: bool = True  # streaming: distances to the sinks counted inside the cache
    score: str = "sum"  # h2o: "sum" of the attention received (the paper), "mean" per query since arrival

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"KV policy {self.kind!r} is unknown; expected one of {', '.join(KINDS)}")
        if self.kind in ("window", "streaming") and (self.window is None or self.window < 1):
            raise ConfigError(f"a {self.kind} KV policy needs window ≥ 1 (recent tokens), got {self.window}")
        if self.sinks < 0 or (self.kind == "streaming" and self.sinks < 1):
            raise ConfigError(f"StreamingLLM needs sinks ≥ 1 (first tokens kept), got {self.sinks}; "
                              "use KVPolicy.window for none")
        if self.kind == "h2o":
            for name in ("heavy", "recent"):
                b = getattr(self, name)
                if b < 0 or (isinstance(b, float) and b >= 1):
                    raise ConfigError(f"H2O's {name} budget must be a fraction in [0, 1) of the context or a "
                                      f"token count ≥ 0, got {b}")
            if self.heavy == 0 and self.recent == 0:
                raise ConfigError("H2O needs a heavy or a recent budget above 0")
            if self.score not in ("sum", "mean"):
                raise ConfigError(f"H2O's score must be 'sum' or 'mean', got {self.score!r}")

    # ---- constructors
    @classmethod
    def full(cls) -> "KVPolicy":
        return cls()

    @classmethod
    def sliding_window(cls, window: int) -> "KVPolicy":
        return cls("window", window=window)

    @classmethod
    def streaming(cls, sinks: int = 4, window: int = 1020, reposition: bool = True) -> "KVPolicy":
        return cls("streaming", window=window, sinks=sinks, reposition=reposition)

    @classmethod
    def h2o(cls, heavy: float = 0.1, recent: float = 0.1, score: str = "sum") -> "KVPolicy":
        return cls("h2o", heavy=heavy, recent=recent, score=score)

    @classmethod
    def parse(cls, text: str) -> "KVPolicy":
        """``full``, ``window:N``, ``streaming:SINKS,WINDOW`` or ``h2o:HEAVY,RECENT[,mean]`` (fractions or
        counts)."""
        kind, _, args = text.strip().partition(":")
        vals = [a.strip() for a in args.split(",")] if args else []
        score = vals.pop() if kind == "h2o" and len(vals) == 3 and vals[2] in ("sum", "mean") else "sum"
        want = {"full": 0, "window": 1, "streaming": 2, "h2o": 2}.get(kind)
        if want is None or len(vals) != want:
            raise ConfigError(f"KV policy {text!r} is not one of full, window:N, streaming:SINKS,WINDOW, "
                              "h2o:HEAVY,RECENT[,mean]")
        try:
            nums = [float(v) if "." in v else int(v) for v in vals]
        except ValueError:
            raise ConfigError(f"KV policy {text!r} has a non-numeric budget") from None
        if kind == "window":
            return cls.sliding_window(int(nums[0]))
        if kind == "streaming":
            return cls.streaming(int(nums[0]), int(nums[1]))
        return cls.h2o(*nums, score=score) if kind == "h2o" else cls.full()

    # ---- what the cache asks
    @property
    def needs_scores(self) -> bool:
        """Whether attention must accumulate each cached token's attention probability (H2O)."""
        return self.kind == "h2o"

    @property
    def visible_window(self) -> int | None:
        return self.window if self.kind in ("window", "streaming") else None

    def _budget(self, b: float, n: int) -> int:
        return math.ceil(b * n) if isinstance(b, float) else int(b)

    def recent_budget(self, n: int) -> int:
        return self._budget(self.recent, n)

    def keep(self, n: int) -> int:
        """Tokens kept after a step that leaves ``n`` tokens of context (the next query adds itself)."""
        if self.kind == "full":
            return n
        if self.kind == "h2o":
            return min(n, self._budget(self.heavy, n) + self._budget(self.recent, n))
        return min(n, self.sinks + self.window - 1)  # type: ignore[operator]

    def evict_order(self, pos: torch.Tensor, score: torch.Tensor | None, n: int) -> torch.Tensor:
        """Eviction priority of each used slot (lowest first; inf: protected), shape of ``pos`` (…, S):
        the oldest non-sink token for window/streaming, the least accumulated attention outside the
        recent tokens for H2O (``score="mean"``: divided by the queries since the token arrived, which
        removes the sum's preference for old tokens)."""
        if self.kind == "h2o":
            key = score.double()  # type: ignore[union-attr]
            if self.score == "mean":
                key = key / (n - pos).clamp(min=1).double()
            return key.masked_fill(pos >= n - self.recent_budget(n), math.inf)
        return pos.double().masked_fill(pos < self.sinks, math.inf)

    def sink_shift(self, q_pos: torch.Tensor) -> torch.Tensor | None:
        """(T,) how far each query's rotation moves for the sink keys (≤ 0), or None: no move. A query at
        ``t`` sees ``sinks + min(window, t + 1 - sinks)`` keys; its cache position is that count − 1."""
        if self.kind != "streaming" or not self.reposition:
            return None
        seen = self.sinks + (q_pos + 1 - self.sinks).clamp(min=0, max=self.window)  # type: ignore[arg-type]
        shift = torch.minimum(seen, q_pos + 1) - 1 - q_pos
        return shift if bool((shift != 0).any()) else None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "window": self.window, "sinks": self.sinks, "heavy": self.heavy,
                "recent": self.recent, "reposition": self.reposition, "score": self.score}
