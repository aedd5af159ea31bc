"""Adapters in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT wraps a transformers model as ``base_model.model.<the model>``, so for a LlamaForCausalLM a LoRA
tensor is saved as ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (``lora_B``,
and DoRA's ``lora_magnitude_vector``). Our module names are transformers', so our keys are PEFT's
without that prefix. ``target_modules`` is written as leaf names ("q_proj", …) when those names
select exactly the adapted layers, else as a regular expression over full names (PEFT full-matches a
string). The safetensors metadata records the base model's shape (``efficientml.base``), so loading
an adapter onto another base model is a clear error, not a silent shape mismatch.

    save_adapter(model, "out/adapter", config, base_model="HuggingFaceTB/SmolLM2-135M")
    model, config = load_adapter(base, "out/adapter")     # ours or PEFT-made
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch.nn as nn

from efficientml.core.errors import CheckpointError, ConfigError, DataNotFoundError, UnsupportedError
from efficientml.core.serialization import atomic_dir, load_state_dict, read_metadata, save_state_dict
from efficientml.core.transform import LayerFilter, apply
from efficientml.finetune.inject import adapter_state_dict, adapters, load_adapter_state_dict
from efficientml.finetune.lora import LoRAConfig, LoRALinear

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def base_signature(model: nn.Module) -> dict[str, int]:
    """What an adapter must agree with: the base model's layer count and widths."""
    c = getattr(model, "config", None)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads")
    return {k: int(getattr(c, k)) for k in keys if c is not None and hasattr(c, k)}


def _target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    inner = (".base_layer", ".lora_A", ".lora_B")  # the linears inside an adapter
    layers = [n for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, LoRALinear)) and not n.endswith(inner)]
    if sorted(n for n in layers if n.rsplit(".", 1)[-1] in leaves) == sorted(names):
        return leaves
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def peft_config(model: nn.Module, config: LoRAConfig, base_model: str | None = None) -> dict[str, Any]:
    names = [n for n, _ in adapters(model)]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
            "target_modules": _target_modules(model, names), "use_rslora": config.rslora,
            "use_dora": config.dora, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
            "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
            "layers_to_transform": None, "layers_pattern": None}


def save_adapter(model: nn.Module, folder: str | os.PathLike, config: LoRAConfig, base_model: str | None = None,
                 overwrite: bool = False) -> Path:
    """Write the model's adapters in PEFT's layout into a new folder (atomically)."""
    state = {PREFIX + k: v.float().contiguous() for k, v in adapter_state_dict(model).items()}
    if not state:
        raise ConfigError("the model has no LoRA adapters to save; apply a LoRAConfig or QLoRAConfig first")
    meta = {"format": "pt", "efficientml.base": json.dumps(base_signature(model))}
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config(model, config, base_model), indent=2) + "\n")
        save_state_dict(tmp / WEIGHTS_FILE, state, metadata=meta)
    return Path(folder)


def read_peft_config(folder: str | os.PathLike, peft_types: tuple[str, ...]) -> dict[str, Any]:
    """A PEFT adapter folder's ``adapter_config.json``, checked: both files there, valid JSON, and a
    ``peft_type`` among ``peft_types``."""
    folder = Path(folder)
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / f).is_file():
            raise DataNotFoundError(f"{str(folder)!r} is not an adapter folder: {f} is missing (expected "
                                    f"{CONFIG_FILE} + {WEIGHTS_FILE}, as PEFT saves them)")
    try:
        pc = json.loads((folder / CONFIG_FILE).read_text())
    except ValueError as e:
        raise CheckpointError(f"{str(folder / CONFIG_FILE)!r} is not valid JSON ({e})") from None
    if not isinstance(pc, dict) or pc.get("peft_type") not in peft_types:
        kind = pc.get("peft_type") if isinstance(pc, dict) else type(pc).__name__
        raise UnsupportedError(f"{str(folder)!r} holds a {kind!r} adapter; expected {' or '.join(peft_types)} here")
    return pc


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    pc = read_peft_config(folder, ("LORA",))
    for key in ("rank_pattern", "alpha_pattern"):
        if pc.get(key):
            raise UnsupportedError(f"{str(folder)!r} uses a per-layer {key}; expected one rank and alpha")
    if pc.get("modules_to_save") or pc.get("bias", "none") != "none" or pc.get("fan_in_fan_out"):
        raise UnsupportedError(f"{str(folder)!r} trains extra modules or biases (modules_to_save/bias), "
                               "which efficientml adapters do not hold")
    return pc


def _filter(model: nn.Module, targets: list[str] | str) -> tuple[tuple[str, ...], LayerFilter | None]:
    if isinstance(targets, str):  # PEFT: a string is a regular expression full-matched against names
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(targets, n)]
        if not names:
            raise ConfigError(f"the adapter's target_modules {targets!r} match no linear layer of this model "
                              "(was it made for another base model?)")
        return ("*",), LayerFilter(include=tuple(names))
    return tuple(targets), None


def load_adapter(model: nn.Module, folder: str | os.PathLike, qlora: LoRAConfig | None = None,
                 inplace: bool = True) -> tuple[nn.Module, LoRAConfig]:
    """Put the adapter saved in ``folder`` (by us or by PEFT) onto ``model``; returns (model, config).
    ``qlora``: a :class:`QLoRAConfig` whose base storage to use (the adapter's rank etc. win)."""
    folder = Path(folder)
    pc = read_adapter_config(folder)
    md = read_metadata(folder / WEIGHTS_FILE)
    want = json.loads(md.get("efficientml.base", "{}"))
    have = base_signature(model)
    diff = {k: (v, have.get(k)) for k, v in want.items() if k in have and have[k] != v}
    if diff:
        raise ConfigError(f"adapter {str(folder)!r} was made for another base model "
                          f"({pc.get('base_model_name_or_path')!r}): (adapter, this model) differ in {diff}")
    targets, flt = _filter(model, pc["target_modules"])
    fields = dict(rank=int(pc["r"]), alpha=float(pc["lora_alpha"]), dropout=float(pc.get("lora_dropout", 0.0)),
                  target_modules=targets, rslora=bool(pc.get("use_rslora", False)),
                  dora=bool(pc.get("use_dora", False)))
    base = qlora.to_dict() if qlora is not None else {}
    base.pop("__kind__", None)
    config = type(qlora)(**{**base, **fields}) if qlora is not None else LoRAConfig(**fields)
    model = apply(model, config, filter=flt, inplace=inplace).model
    state = {k.removeprefix(PREFIX): v for k, v in load_state_dict(folder / WEIGHTS_FILE).items()}
    state = {k.replace(".default.", ".") if ".default." in k else k: v for k, v in state.items()}
    load_adapter_state_dict(model, state, where=f"adapter {str(folder)!r}")
    return model, config
