"""Stop strings: end a row when its generated *text* contains one of some strings (vLLM's ``stop``,
transformers' ``stop_strings``), whatever tokens spell it.

A string can span several tokens and a token can hold text on both sides of it, so the check runs on
decoded text, not ids. :class:`StopText` takes the streamed text pieces of one row and returns what
may be shown now: text that can no longer turn into a stop string is released, a tail that could
still be the start of one is held back, and once a stop string is complete everything from its first
character on is dropped (the stop string is not part of the output, as in vLLM)::

    stop = StopText(["\\n\\n", "User:"])
    shown, done = stop.feed(piece)      # per streamed piece; done: a stop string was completed
    rest = stop.flush()                 # at the end: the held-back tail, if no stop string came

``generate(…, config=SamplingConfig(stop_strings=…), tokenizer=tok)`` ends a row at the token that
completes a stop string (that token is the row's last); ``StopText`` over the same pieces gives the
text up to the stop string.
"""

from __future__ import annotations

from typing import Sequence

from efficientml.core.errors import ConfigError


class StopText:
    def __init__(self, stops: Sequence[str]) -> None:
        stops = tuple(stops)
        if any(not isinstance(s, str) or not s for s in stops):
            raise ConfigError(f"stop strings must be non-empty strings, got {stops!r}")
        self.stops = stops
        self.held = ""  # text not yet released: it may begin a stop string
        self.done = False

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add a piece of text; return (text safe to show now, whether a stop string completed)."""
        if self.done:
            return "", True
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.done, self.held = True, ""
            return text[:min(hits)], True
        keep = 0  # the longest tail of text that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """The held-back tail (no stop string came); empty after a stop."""
        rest, self.held = self.held, ""
        return rest
