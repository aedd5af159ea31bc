"""OpenAI's request bodies as pydantic models (strict: no unknown fields, no type coercion), and the error body.

Supported as OpenAI defines them: ``model``, ``prompt`` (text, a list of texts, token ids, or a list of
token-id lists), ``messages``, ``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``,
``n``, ``stop``, ``seed``, ``logprobs`` / ``top_logprobs``, ``stream``, ``stream_options.include_usage``,
``user``. Extensions, as vLLM names them: ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``.
Accepted only at their defaults (a 400 names the field otherwise): ``presence_penalty``,
``frequency_penalty``, ``logit_bias``, ``echo``, ``suffix``, ``best_of``.

This module needs pydantic (``pip install 'efficientml[serve]'``); the library never imports it eagerly.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from efficientml.llm.serve.sequence import SamplingParams

# fields OpenAI defines that the engine does not implement: their default, accepted as a no-op
UNSUPPORTED_DEFAULTS = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None, "echo": False,
                        "suffix": None, "best_of": None}


class BadRequest(Exception):
    """A request the server refuses with 400 (or ``status``); ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str
    max_tokens: Optional[int] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None
    # extensions (vLLM's names)
    top_k: Optional[int] = Field(None, ge=1)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    ignore_eos: bool = False

    def check_supported(self) -> None:
        for name, default in UNSUPPORTED_DEFAULTS.items():
            if getattr(self, name, default) not in (default, {}):
                raise BadRequest(f"{name!r} is not supported by this server; leave it at its default ({default})",
                                 name, "unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise BadRequest("'stream_options' applies only with 'stream': true", "stream_options")
        if len(self.stops) > 4 or any(not s for s in self.stops):
            raise BadRequest("'stop' takes up to 4 non-empty strings", "stop")

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling(self, max_tokens: int, logprobs: int | None, stop_token_ids: tuple[int, ...] = ()
                 ) -> SamplingParams:
        """The engine's parameters for this request (``max_tokens`` resolved by the server);
        ``stop_token_ids``: the model's end-of-turn ids besides the tokenizer's EOS (not with ``ignore_eos``)."""
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature,
                              top_p=self.top_p if self.top_p < 1.0 else None, top_k=self.top_k,
                              min_p=self.min_p or None, repetition_penalty=self.repetition_penalty,
                              seed=self.seed, stop=self.stops, stop_token_ids=() if self.ignore_eos else stop_token_ids,
                              ignore_eos=self.ignore_eos, logprobs=logprobs, n=self.n)


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16  # OpenAI's default for completions
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    def check_supported(self) -> None:
        if self.best_of is not None and self.best_of == self.n:
            self.best_of = None  # best_of = n is plain sampling
        super().check_supported()

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each text or token ids; 400 for an empty one."""
        p = self.prompt
        items = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not items or any(len(x) == 0 for x in items):
            raise BadRequest("the prompt is empty; give text or at least one token id", "prompt", "empty_prompt")
        return items


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise BadRequest("'messages' is empty; give at least one message", "messages", "empty_prompt")
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise BadRequest("give 'max_completion_tokens' or its older name 'max_tokens', not both",
                             "max_completion_tokens")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        """The messages as a chat template reads them (``developer`` is OpenAI's newer ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]
