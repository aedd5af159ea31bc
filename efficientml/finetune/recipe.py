"""The fine-tuning recipe the CLI and the benchmark share: prepare the model for a method, build the
training rows from a .jsonl file or a text corpus, evaluate held-out loss, save the result.

    model = prepare(model, "qlora", LoRAConfig(rank=16, alpha=32))
    train, held_out = corpus_rows(tok, "tinyshakespeare", max_length=256)   # first 90% / last 10%
    hist = train_sft(model, batches(*train, 4), SFTConfig(steps=100))
    held_out_loss(model, held_out)                                           # mean nats per token
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from efficientml.core.config import Config
from efficientml.core.errors import ConfigError
from efficientml.core.transform import apply
from efficientml.finetune.lora import LoRAConfig
from efficientml.finetune.methods import PEFT_METHODS
from efficientml.finetune.qlora import QLoRAConfig
from efficientml.finetune.sft import token_loss
from efficientml.finetune.sft_data import IGNORE, encode_all, lm_rows, pack, pad, read_jsonl

METHODS = ("lora", "qlora", "w4lora", "dora", "full") + tuple(PEFT_METHODS)


def prepare(model: nn.Module, method: str, lora: LoRAConfig | None = None, config: Config | None = None) -> nn.Module:
    """``model`` ready to train with ``method`` (in place): adapters on a float or NF4 base, every
    parameter trainable ("full"), or one of :data:`PEFT_METHODS` (``config``, default its defaults)."""
    if method not in METHODS:
        raise ConfigError(f"fine-tuning method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method in PEFT_METHODS:
        return apply(model, config or PEFT_METHODS[method](), inplace=True).model
    lora = lora or LoRAConfig()
    if method == "dora":
        lora = dataclasses.replace(lora, dora=True)
    if method == "qlora" and not isinstance(lora, QLoRAConfig):
        d = lora.to_dict()
        d.pop("__kind__")
        lora = QLoRAConfig(**d)
    if method == "w4lora":  # LoRA on a W4 base (int4 grid, groups of 32): merges back onto the same grid
        from efficientml.finetune.w4base import W4LoRAConfig

        if not isinstance(lora, W4LoRAConfig):
            d = lora.to_dict()
            d.pop("__kind__")
            lora = W4LoRAConfig(**{k: v for k, v in d.items() if k in LoRAConfig.__dataclass_fields__})
    return apply(model, lora, inplace=True).model


def corpus_rows(tok: Any, name: str, max_length: int, train_fraction: float = 0.9,
                max_chars: int | None = None) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A text corpus as language-modelling rows: ((ids, labels) from the first ``train_fraction``, the
    held-out rows from the rest). ``max_chars`` reads only the start of each part (quick runs)."""
    from efficientml.data.text import load_text

    text = load_text(name)
    cut = int(len(text) * train_fraction)
    train, test = text[:cut], text[cut:]
    if max_chars is not None:
        train, test = train[:max_chars], test[:max_chars]
    tr = lm_rows(tok.encode(train), max_length)
    te, _ = lm_rows(tok.encode(test), max_length)
    return tr, te


def jsonl_rows(tok: Any, path: str | os.PathLike, max_length: int,
               packing: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    enc = encode_all(tok, read_jsonl(path), source=str(path))
    return pack(enc, max_length) if packing else pad(enc, max_length, tok.eos_id or 0)


@torch.no_grad()
def held_out_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor | None = None,
                  batch_size: int = 4) -> dict[str, float]:
    """Mean next-token loss (nats) and perplexity over the rows."""
    was = model.training
    model.eval()
    labels = ids if labels is None else labels
    total, count = 0.0, 0
    dev = next(model.parameters()).device
    for s in range(0, ids.shape[0], batch_size):
        loss, n = token_loss(model, ids[s:s + batch_size].to(dev), labels[s:s + batch_size].to(dev))
        total, count = total + loss.item(), count + n
    model.train(was)
    mean = total / max(1, count)
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": count}


def save_result(model: nn.Module, tok: Any, out: str | os.PathLike, method: str, lora: LoRAConfig | None,
                base_model: str | None, overwrite: bool = False, config: Config | None = None) -> Path:
    """LoRA/QLoRA/DoRA: the adapter in PEFT's layout; full: a Hugging Face folder of the whole model;
    the other methods: their config + trainable tensors (:mod:`efficientml.finetune.method_io`)."""
    if method in PEFT_METHODS:
        from efficientml.finetune.method_io import save_trainable

        return save_trainable(model, out, config or PEFT_METHODS[method](), overwrite=overwrite)
    if method == "dora" and lora is not None:
        lora = dataclasses.replace(lora, dora=True)
    if method == "full":
        from efficientml.llm.io.load import save_hf

        return save_hf(model, tok, out, overwrite=overwrite)
    from efficientml.finetune.peft_io import save_adapter

    return save_adapter(model, out, lora or LoRAConfig(), base_model, overwrite=overwrite)


__all__ = ["IGNORE", "METHODS", "corpus_rows", "held_out_loss", "jsonl_rows", "prepare", "save_result"]
