"""Merging a LoRA trained on a quantized base into a 4-bit model, done right (peft #2321, unsloth #1519).

Merging an adapter into a 4-bit base means the merged weight must be rounded again. Rounding
``W_base + s·BA`` to the nearest grid point (RTN) throws away most of the adapter's small update
(each weight moves by far less than a grid step). Here the merged float model — the dequantized base
plus the adapter, the same function as base+adapter — is re-quantized with calibration (GPTQ, or AWQ),
which chooses the codes that keep the layer *outputs* on calibration text, and so keeps the update.
Both are returned, so the gain is measurable::

    res = merge_into_quantized(qlora_model, calib, MergeQuantConfig(method="gptq"))
    res.calibrated, res.naive                        # packed W4 models (QuantLinear)
    save_merged(res.calibrated, tok, "out/merged-w4")   # compressed-tensors folder + GGUF (Q4_0)

The default grid (4 bits, symmetric, groups of 32) is exactly GGUF's Q4_0, so the GGUF file holds the
same weights as the packed checkpoint.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from efficientml.core.config import Config, check_choice
from efficientml.core.errors import ConfigError
from efficientml.core.transform import apply
from efficientml.finetune.inject import adapters, merge_and_unload

METHODS = ("gptq", "awq", "awq_gptq")


@dataclass(frozen=True)
class MergeQuantConfig(Config):
    kind = "merge_quant"
    method: str = "gptq"             # the calibrated re-quantization: "gptq" | "awq" | "awq_gptq" (AWQ
                                     # scales, then GPTQ rounding)
    w_bits: int = 4
    group_size: int | None = 32
    symmetric: bool = True           # with 4 bits and groups of 32: GGUF Q4_0, bit for bit

    def validate(self) -> None:
        check_choice("method", self.method, METHODS)
        self.quant_config()  # validates bits and group size

    def quant_config(self) -> Config:
        from efficientml.llm.compress import AWQConfig, GPTQConfig

        kw = dict(w_bits=self.w_bits, group_size=self.group_size, symmetric=self.symmetric)
        if self.method == "gptq":
            return GPTQConfig(**kw)
        return AWQConfig(**kw, use_gptq=self.method == "awq_gptq")

    def naive_config(self) -> Config:
        from efficientml.llm.compress import RTNConfig

        return RTNConfig(w_bits=self.w_bits, group_size=self.group_size, symmetric=self.symmetric)


@dataclass
class MergeResult:
    calibrated: nn.Module
    naive: nn.Module
    report: dict[str, Any] = field(default_factory=dict)


def merged_float(model: nn.Module) -> nn.Module:
    """A float copy of ``model`` with every adapter merged (a packed NF4 base dequantized first)."""
    if not adapters(model):
        raise ConfigError("merge_into_quantized needs a model with LoRA adapters (trained with --method lora "
                          "or qlora); a model without one has nothing to merge")
    return merge_and_unload(copy.deepcopy(model))


def merge_into_quantized(model: nn.Module, calib: torch.Tensor, cfg: MergeQuantConfig = MergeQuantConfig(),
                         progress: bool | None = False) -> MergeResult:
    """Merge ``model``'s adapters and quantize the result twice: calibrated (``cfg.method`` on ``calib``,
    (N, T) token ids) and naively (round to nearest). ``model`` is left as it is."""
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype != torch.long:
        raise ConfigError("calib must be a (samples, tokens) tensor of token ids (int64), e.g. from "
                          "efficientml.llm.compress.calibration_tokens")
    merged = merged_float(model)
    naive = apply(copy.deepcopy(merged), cfg.naive_config(), inplace=True)
    calibrated = apply(merged, cfg.quant_config(), calib=calib, inplace=True, progress=progress)
    report = {"config": cfg.to_dict(), "calib_shape": list(calib.shape),
              "calibrated": {k: v for k, v in calibrated.report.items() if k != "blocks"},
              "naive": {k: v for k, v in naive.report.items() if k != "blocks"}}
    return MergeResult(calibrated.model, naive.model, report)


def check_gguf_writable(model: nn.Module, tokenizer: Any) -> None:
    """Raise now (before any training) the error :func:`save_merged` would raise at the end if the
    model's family or its tokenizer has no GGUF form."""
    from efficientml.llm.io.gguf_tokenizer import tokenizer_metadata
    from efficientml.llm.io.gguf_write import gguf_family, model_metadata

    if tokenizer is None:
        raise ConfigError("a GGUF file carries its tokenizer: the model has none to write")
    fam = gguf_family(model.config)
    model_metadata(model.config, fam, "f16", "merged")
    tokenizer_metadata(tokenizer, model.config.vocab_size, model.config)


def save_merged(model: nn.Module, tokenizer: Any, out: str | os.PathLike, overwrite: bool = False,
                gguf: bool = True) -> dict[str, str]:
    """Write a merged W4 model as a packed checkpoint (compressed-tensors folder ``out``) and, with
    ``gguf``, as ``out.gguf`` beside it (the quantized linears exactly, Q4_0 for the default grid)."""
    from efficientml.llm.io.compressed import save_compressed

    out = Path(out)
    if gguf:
        check_gguf_writable(model, tokenizer)
    paths = {"packed": str(save_compressed(model, tokenizer, out, overwrite=overwrite))}
    if gguf:
        from efficientml.llm.io.gguf_write import save_gguf

        paths["gguf"] = str(save_gguf(model, tokenizer, out.with_suffix(".gguf"), outtype="f16",
                                      overwrite=overwrite))
    return paths
