"""OpenAI's response bodies and stream chunks, built from the engine's :class:`~.request.CompletionOutput`.

- completions: ``{"object": "text_completion", "choices": [{"index", "text", "logprobs", "finish_reason"}],
  "usage"}``; a stream sends the same object per piece (``text`` the new text).
- chat: ``{"object": "chat.completion", "choices": [{"index", "message": {"role", "content"}, "logprobs",
  "finish_reason"}], "usage"}``; a stream sends ``chat.completion.chunk`` objects whose ``delta`` is
  ``{"role": "assistant", "content": ""}`` first, then ``{"content": piece}``, then ``{}`` with the
  ``finish_reason``.
- with ``stream_options.include_usage`` every chunk has ``"usage": null`` and one last chunk has
  ``"choices": []`` and the usage; every stream ends with ``data: [DONE]``.

Choice ``index`` = prompt index × n + the sequence's index, as OpenAI numbers a list of prompts.
"""

from __future__ import annotations

import json

from efficientml.llm.serve.request import CompletionOutput


def sse(obj: dict | str) -> str:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


DONE = sse("[DONE]")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(c: CompletionOutput) -> str | None:
    return None if c.finish_reason in (None, "abort") else c.finish_reason


class Formatter:
    """The bodies of one response: ``kind`` "completion" or "chat"; ``tokenizer`` spells token ids."""

    def __init__(self, kind: str, rid: str, created: int, model: str, tokenizer, include_usage: bool = False):
        self.kind, self.rid, self.created, self.model, self.tok = kind, rid, created, model, tokenizer
        self.include_usage = include_usage
        self._text_offsets: dict[int, int] = {}  # completions' text_offset, per choice, across stream chunks

    def _head(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def _token(self, i: int) -> str:
        return self.tok.decode([i])

    # ---- logprobs
    def logprobs(self, index: int, c: CompletionOutput, new_only: bool) -> dict | None:
        if c.logprobs is None:
            return None
        k = len(c.new_token_ids) if new_only else len(c.token_ids)
        ids = c.token_ids[len(c.token_ids) - k:]
        lps = c.logprobs[len(c.logprobs) - k:]
        tops = c.top_logprobs[len(c.top_logprobs) - k:] if c.top_logprobs else [{}] * k
        return (self._completion_logprobs if self.kind == "completion" else self._chat_logprobs)(index, ids, lps, tops)

    def _completion_logprobs(self, index: int, ids, lps, tops) -> dict:
        tokens = [self._token(i) for i in ids]
        offsets, at = [], self._text_offsets.get(index, 0)
        for t in tokens:
            offsets.append(at)
            at += len(t)
        self._text_offsets[index] = at
        return {"tokens": tokens, "token_logprobs": list(lps),
                "top_logprobs": [{self._token(t): lp for t, lp in top.items()} for top in tops] if any(tops) else None,
                "text_offset": offsets}

    def _chat_logprobs(self, index: int, ids, lps, tops) -> dict:
        def entry(i: int, lp: float) -> dict:
            s = self._token(i)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {"content": [{**entry(i, lp), "top_logprobs": [entry(t, v) for t, v in top.items()]}
                            for i, lp, top in zip(ids, lps, tops)], "refusal": None}

    # ---- whole responses
    def response(self, choices: list[tuple[int, CompletionOutput]], prompt_tokens: int) -> dict:
        body = self._head("text_completion" if self.kind == "completion" else "chat.completion")
        out = []
        for index, c in choices:
            ch = {"index": index}
            if self.kind == "completion":
                ch["text"] = c.text
            else:
                ch["message"] = {"role": "assistant", "content": c.text}
            ch["logprobs"] = self.logprobs(index, c, new_only=False)
            ch["finish_reason"] = finish_reason(c)
            out.append(ch)
        body["choices"] = out
        body["usage"] = usage(prompt_tokens, sum(len(c.token_ids) for _, c in choices))
        return body

    # ---- stream chunks
    def chunk(self, index: int, c: CompletionOutput | None) -> dict:
        """The chunk for ``c``'s new text (``c`` None: a chat stream's first, role chunk)."""
        body = self._head("text_completion" if self.kind == "completion" else "chat.completion.chunk")
        ch: dict = {"index": index}
        if self.kind == "completion":
            ch["text"] = c.new_text
        elif c is None:
            ch["delta"] = {"role": "assistant", "content": ""}
        else:
            ch["delta"] = {"content": c.new_text} if c.new_text or c.finish_reason is None else {}
        ch["logprobs"] = None if c is None else self.logprobs(index, c, new_only=True)
        ch["finish_reason"] = None if c is None else finish_reason(c)
        body["choices"] = [ch]
        if self.include_usage:
            body["usage"] = None
        return body

    def chunks(self, index: int, c: CompletionOutput) -> list[dict]:
        """The chunks for one step's output of a choice: a chat stream's last piece of text and its
        ``finish_reason`` go in two chunks (the last with an empty delta), as OpenAI sends them."""
        if self.kind == "chat" and c.new_text and c.finish_reason is not None:
            last = self.chunk(index, c)
            last["choices"][0].update(delta={}, logprobs=None)
            text = self.chunk(index, c)
            text["choices"][0]["finish_reason"] = None
            return [text, last]
        return [self.chunk(index, c)] if c.new_text or c.finish_reason is not None or c.logprobs is not None else []

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        body = self._head("text_completion" if self.kind == "completion" else "chat.completion.chunk")
        body["choices"] = []
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return body
