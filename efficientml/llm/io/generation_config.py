"""The sampling settings a model ships with: read from a Hugging Face folder's generation_config.json
(as transformers reads it) or a GGUF file's ``general.sampling.*`` metadata (as llama.cpp's converter
writes it), and written back into generation_config.json. ``llm generate`` / ``llm chat`` use them where
no flag is given (``--generation-config auto``, as in vLLM); convert, quantize and prune carry them over.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from efficientml.core.errors import ConfigError
from efficientml.llm.config import LlamaConfig

# llama.cpp's sampling defaults in GGUF metadata (written by its converter from generation_config.json)
GGUF_SAMPLING = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
                  "general.sampling.top_p": "top_p", "general.sampling.min_p": "min_p",
                  "general.sampling.penalty_repeat": "repetition_penalty"}


def generation_defaults(source: Any) -> dict[str, float | int]:
    """The sampling settings a model ships with, as :class:`~efficientml.llm.generate.SamplingConfig`
    fields (only those it sets), to use where the user sets none (transformers' ``generate`` and vLLM's
    ``--generation-config auto`` do the same).

    A folder's generation_config.json is read as transformers reads it: temperature, top-k, top-p and
    min-p only with ``do_sample: true`` (else decoding is greedy; temperature 1.0 when only
    ``do_sample`` is given), the repetition penalty always; top-k 0 means off. A GGUF file's
    ``general.sampling.*`` keys are taken as they are. An invalid value is a :class:`ConfigError`."""
    from efficientml.llm.generate import SamplingConfig

    from efficientml.llm.io.source import open_source

    src = open_source(source)
    if isinstance(src, Path):
        where = src / "generation_config.json"
        try:
            gc = json.loads(where.read_text()) if where.is_file() else {}
        except (OSError, ValueError) as e:
            raise ConfigError(f"{str(where)!r} is not valid JSON ({e})") from None
        gc = gc if isinstance(gc, dict) else {}
        out: dict[str, Any] = {}
        if gc.get("do_sample") is True:
            out["temperature"] = gc.get("temperature", 1.0)
            out.update({k: gc[k] for k in ("top_k", "top_p", "min_p") if gc.get(k) is not None})
        if gc.get("repetition_penalty") is not None:
            out["repetition_penalty"] = gc["repetition_penalty"]
    else:
        where = src.path
        out = {field: src.meta[key] for key, field in GGUF_SAMPLING.items() if src.meta.get(key) is not None}
    if out.get("top_k") == 0:
        del out["top_k"]
    try:
        out = {k: int(v) if k == "top_k" else float(v) for k, v in out.items()}
        SamplingConfig(**out)  # validates
    except (TypeError, ValueError) as e:  # ConfigError is a ValueError
        raise ConfigError(f"{str(where)!r}: the model's sampling defaults {out} are invalid ({e})") from None
    return out


def generation_config(cfg: LlamaConfig, sampling: dict[str, Any] | None = None) -> dict[str, Any]:
    """generation_config.json's contents: the special token ids, and sampling defaults (SamplingConfig
    fields, as :func:`generation_defaults` returns them) in transformers' form: ``do_sample`` with
    temperature, top-k, top-p and min-p when the temperature is above 0; the repetition penalty always."""
    gen: dict[str, Any] = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    if cfg.pad_token_id is not None:
        gen["pad_token_id"] = cfg.pad_token_id
    s = dict(sampling or {})
    unknown = set(s) - {"temperature", "top_k", "top_p", "min_p", "repetition_penalty"}
    if unknown:
        raise ConfigError(f"sampling defaults {sorted(unknown)} are not generation_config fields")
    if s.get("temperature", 0.0) > 0:
        gen["do_sample"] = True
        gen.update({k: s[k] for k in ("temperature", "top_k", "top_p", "min_p") if k in s})
    if "repetition_penalty" in s:
        gen["repetition_penalty"] = s["repetition_penalty"]
    return gen
