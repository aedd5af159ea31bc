"""Prompt and prefix tuning in PEFT's layout: ``adapter_config.json`` (``peft_type`` PROMPT_TUNING or
PREFIX_TUNING) + ``adapter_model.safetensors`` holding one tensor, ``prompt_embeddings``: the soft
prompt (n, d), or the flattened per-layer key/value prefix (n, layers·2·n_kv·head_dim), as PEFT saves
them. A prefix trained through the projection MLP is saved as the prefix it produces (PEFT does the
same for inference: an MLP-free prefix), so peft loads either with equal logits, and we load peft's.

    save_prompt_adapter(model, "out/prefix", base_model="HuggingFaceTB/SmolLM2-135M")
    model, config = load_prompt_adapter(base, "out/prefix")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from efficientml.core.errors import ConfigError, UnsupportedError
from efficientml.core.serialization import atomic_dir, load_state_dict, read_metadata, save_state_dict
from efficientml.core.transform import apply
from efficientml.finetune.peft_io import CONFIG_FILE, WEIGHTS_FILE, base_signature, read_peft_config
from efficientml.finetune.prompt import PrefixEncoder, PrefixTuningConfig, PromptEmbedding, PromptTuningConfig

KEY = "prompt_embeddings"


@torch.no_grad()
def save_prompt_adapter(model: nn.Module, folder: str | os.PathLike, base_model: str | None = None,
                        overwrite: bool = False) -> Path:
    vt = getattr(model, "virtual_tokens", None)
    if not isinstance(vt, (PromptEmbedding, PrefixEncoder)):
        raise ConfigError("the model has no prompt or prefix to save; apply a PromptTuningConfig or PrefixTuningConfig")
    n = vt.num_virtual_tokens
    if isinstance(vt, PromptEmbedding):
        kind, tensor = "PROMPT_TUNING", vt.embedding
        extra = {"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None}
    else:  # (L, 2, n_kv, n, hd) → PEFT's (n, L·2·n_kv·hd), the order its get_prompt views it back in
        kind, tensor = "PREFIX_TUNING", vt.key_values().permute(3, 0, 1, 2, 4).reshape(n, -1)
        extra = {"prefix_projection": False, "encoder_hidden_size": None}
    pc = {"peft_type": kind, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
          "num_virtual_tokens": n, "token_dim": None, "num_transformer_submodules": None,
          "num_attention_heads": None, "num_layers": None, "inference_mode": True, **extra}
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(pc, indent=2) + "\n")
        save_state_dict(tmp / WEIGHTS_FILE, {KEY: tensor.detach().float().contiguous()},
                        metadata={"format": "pt", "efficientml.base": json.dumps(base_signature(model))})
    return Path(folder)


def _read(folder: Path) -> dict:
    pc = read_peft_config(folder, ("PROMPT_TUNING", "PREFIX_TUNING"))
    if (pc.get("num_transformer_submodules") or 1) != 1:
        raise UnsupportedError(f"{str(folder)!r} is for an encoder-decoder model (num_transformer_submodules > 1)")
    return pc


def load_prompt_adapter(model: nn.Module, folder: str | os.PathLike,
                        inplace: bool = True) -> tuple[nn.Module, PromptTuningConfig | PrefixTuningConfig]:
    """Put the prompt or prefix saved in ``folder`` (by us or by PEFT) onto ``model``."""
    folder = Path(folder)
    pc = _read(folder)
    want = json.loads(read_metadata(folder / WEIGHTS_FILE).get("efficientml.base", "{}"))
    diff = {k: v for k, v in want.items() if base_signature(model).get(k, v) != v}
    state = load_state_dict(folder / WEIGHTS_FILE)
    if diff or KEY not in state:
        raise ConfigError(f"adapter {str(folder)!r} does not fit this model (made for another base model: {diff}, "
                          f"or without a {KEY!r} tensor)")
    n = int(pc["num_virtual_tokens"])
    config = PromptTuningConfig(n) if pc["peft_type"] == "PROMPT_TUNING" else PrefixTuningConfig(n)
    model = apply(model, config, inplace=inplace).model
    dest = model.virtual_tokens.embedding
    if tuple(state[KEY].shape) != tuple(dest.shape):
        raise ConfigError(f"adapter {str(folder)!r}: {KEY} has shape {tuple(state[KEY].shape)}, this model's "
                          f"{pc['peft_type'].lower()} expects {tuple(dest.shape)} (another base model?)")
    with torch.no_grad():
        dest.copy_(state[KEY].to(dest.dtype))
    return model, config
