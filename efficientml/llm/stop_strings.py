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

:class:`TextStream` is one row's text as ``generate(…, tokenizer=tok)`` produces it: token ids
decoded as they come (an incomplete UTF-8 character held back), stop tokens left out, cut at a stop
string. ``generate`` ends a row at the token that completes a stop string (that token is the row's
last), streams each row's shown pieces to ``on_text`` and returns the texts in ``result.texts``.
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


class TextStream:
    """One row's generated text: ``put(token_id)`` returns the piece that may be shown now."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = (), stop_ids: Sequence[int] = ()) -> None:
        self.decoder = tokenizer.stream(skip_special_tokens=True)
        self.stop = StopText(stop_strings)
        self.stop_ids = set(stop_ids)
        self.pieces: list[str] = []

    @property
    def done(self) -> bool:  # a stop string was completed
        return self.stop.done

    def put(self, token_id: int) -> str:
        if token_id in self.stop_ids or self.stop.done:
            return ""
        piece = self.stop.feed(self.decoder.put(token_id))[0]
        self.pieces.append(piece)
        return piece

    def flush(self) -> str:
        """At the end: the held-back tail, if no stop string came."""
        piece = self.stop.flush()
        self.pieces.append(piece)
        return piece

    @property
    def text(self) -> str:
        return "".join(self.pieces)
