"""Chat templates (Jinja, from the model's files) rendered in a sandbox with bounds.

Jinja's sandbox stops a template from calling unsafe code; it does not stop loops or big values. A
template that came with a model file is untrusted input, so rendering here is also bounded: at most
:data:`MAX_CHARS` characters of output, :data:`MAX_SECONDS` seconds (checked on every line the
compiled template executes, so an empty nested loop is caught too), ``*`` results and ``**``
exponents of bounded size. Every failure — a syntax error, a sandbox refusal, an overflow, a bound —
is one :class:`ConfigError` sentence.
"""

from __future__ import annotations

import json
import operator
import sys
import time
from datetime import datetime
from typing import Any

from efficientml.core.errors import ConfigError
from efficientml.core.lazy import optional_import

MAX_CHARS = 8_000_000     # a 128k-token conversation is ~0.5 M characters
MAX_SECONDS = 10.0
MAX_POWER = 4096          # bits of a ** result
RESERVED = ("messages", "add_generation_prompt", "bos_token", "eos_token")


class _Bound(Exception):
    """Raised inside the render to stop it; turned into a ConfigError outside."""


def compile_template(source: str):
    """A compiled template in an immutable sandbox with the helpers Hugging Face templates use."""
    ext = optional_import("jinja2.ext", "llm", "chat templates")
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Env(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, op, left, right):
            if op == "**":
                if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                        right * max(abs(left), 2).bit_length() > MAX_POWER:
                    raise _Bound(f"{left} ** {right} is too large")
                return operator.pow(left, right)
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_CHARS:
                    raise _Bound(f"a value of {len(seq) * n} items is too large")
            return operator.mul(left, right)

    def raise_exception(msg: str) -> None:
        raise ConfigError(f"chat template: {msg}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)  # no HTML escaping, unlike Jinja's own filter

    env = Env(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # Llama-3.1+ date line
    env.filters["tojson"] = tojson
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ConfigError(f"the model's chat template does not compile ({type(e).__name__}: {e})") from None


def render(template, variables: dict[str, Any]) -> str:
    """Render with the bounds of the module doc."""
    deadline = time.monotonic() + MAX_SECONDS

    def tracer(frame, event, arg):  # every line of the compiled template checks the clock
        if time.monotonic() > deadline:
            raise _Bound(f"rendering took more than {MAX_SECONDS:g} s")
        return tracer

    previous = sys.gettrace()
    parts, size = [], 0
    sys.settrace(tracer)
    try:
        for piece in template.generate(**variables):
            size += len(piece)
            if size > MAX_CHARS:
                raise _Bound(f"its output passed {MAX_CHARS:,} characters")
            parts.append(piece)
    except _Bound as e:
        raise ConfigError(f"the model's chat template was stopped: {e}") from None
    except ConfigError:
        raise
    except Exception as e:  # Jinja's SecurityError/UndefinedError, OverflowError, TypeError, RecursionError …
        raise ConfigError(f"the model's chat template failed ({type(e).__name__}: {e})") from None
    finally:
        sys.settrace(previous)
    return "".join(parts)


def check_variables(extra: dict[str, Any], flag: str = "template variables") -> None:
    taken = [k for k in extra if k in RESERVED]
    if taken:
        raise ConfigError(f"{flag} may not set {taken[0]!r}: efficientml sets it (the conversation, the "
                          "generation prompt and special tokens); remove it")
