"""Multi-turn chat over one KV cache: each turn renders the whole conversation with the model's chat
template, keeps the cached prefix that still matches, and prefills only the new tokens.

    chat = ChatSession(model, tok)
    reply = chat.send("What is the capital of France?", on_text=print)
    reply.text, reply.result.ttft_s, reply.result.decode_tok_s
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from efficientml.core.errors import ShapeError
from efficientml.llm.generate import GenerationResult, SamplingConfig, generate
from efficientml.llm.kv_cache import StaticKVCache


@dataclass
class Reply:
    text: str
    result: GenerationResult
    prefilled_tokens: int  # new prompt tokens this turn (the rest came from the cache)


class ChatSession:
    def __init__(self, model, tokenizer, system: str | None = None,
                 sampling: SamplingConfig = SamplingConfig(max_new_tokens=256),
                 max_context: int | None = None, template_kwargs: dict | None = None) -> None:
        """``template_kwargs``: extra variables for the chat template (e.g. Qwen3's
        ``{"enable_thinking": False}``), as transformers' and vLLM's ``chat_template_kwargs``."""
        self.model, self.tok = model, tokenizer
        self.template_kwargs = dict(template_kwargs or {})
        stops = set(sampling.stop_token_ids)
        for t in (tokenizer.eos_id, *model.config.eos_token_ids):
            if t is not None:
                stops.add(int(t))
        self.sampling = replace(sampling, stop_token_ids=tuple(sorted(stops)))
        self.system = system
        self.messages: list[dict[str, str]] = []
        ctx = min(max_context or model.config.max_position_embeddings, model.config.max_position_embeddings)
        self.cache = StaticKVCache.for_model(model, 1, ctx)
        self.cached: list[int] = []  # token ids whose keys/values are in the cache

    def reset(self) -> None:
        self.messages, self.cached = [], []
        self.cache.reset()

    def _prompt_ids(self) -> list[int]:
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        text = self.tok.apply_chat_template(msgs, add_generation_prompt=True, **self.template_kwargs)
        return self.tok.encode(text, add_bos=False)

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> Reply:
        self.messages.append({"role": "user", "content": text})
        room = self.cache.max_length - self.sampling.max_new_tokens
        ids = self._prompt_ids()
        while len(ids) > room and len(self.messages) > 1:  # forget the oldest exchange
            self.messages = self.messages[2:] if len(self.messages) > 2 else self.messages[-1:]
            ids = self._prompt_ids()
        if len(ids) > room:
            self.messages.pop()
            raise ShapeError(f"the message needs {len(ids)} tokens but the context leaves {max(room, 0)} "
                             f"for the prompt ({self.cache.max_length} minus {self.sampling.max_new_tokens} "
                             "for the answer)")
        p = 0
        limit = min(len(self.cached), len(ids) - 1)  # prefill at least one token
        while p < limit and self.cached[p] == ids[p]:
            p += 1
        self.cache.length = p  # keep the matching prefix, overwrite the rest
        res = generate(self.model, ids[p:], self.sampling, cache=self.cache, tokenizer=self.tok,
                       on_text=None if on_text is None else lambda _, piece: on_text(piece))
        out = res.tokens[0]
        self.cached = ids + out[:-1]  # the last sampled token was never fed to the model
        answer = res.texts[0]
        self.messages.append({"role": "assistant", "content": answer.strip()})
        return Reply(answer, res, len(ids) - p)
