"""Saving and loading what a PEFT method trained (BitFit, bottleneck adapters, prompt/prefix tuning,
IA3, TinyTL, and LoRA/DoRA too): ``method_config.json`` (the config, so the method can be applied
again to a fresh base) + ``trainable.safetensors`` (the trainable tensors by module name).

    save_trainable(model, "out/ia3", IA3Config())
    model, config = load_trainable(fresh_base, "out/ia3")   # apply(config) again, then the tensors

LoRA/DoRA adapters for PEFT go through :mod:`efficientml.finetune.peft_io` (PEFT's own layout).
The metadata records the base model's shape, so a state made for another base is a clear error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from efficientml.core.config import Config
from efficientml.core.errors import CheckpointError, ConfigError, DataNotFoundError
from efficientml.core.serialization import atomic_dir, load_state_dict, read_metadata, save_state_dict
from efficientml.core.transform import apply

CONFIG_FILE, WEIGHTS_FILE = "method_config.json", "trainable.safetensors"


def _signature(model: nn.Module) -> dict[str, Any]:
    """Every parameter's shape: what a trainable state must agree with besides its own tensors."""
    return {"parameters": sum(p.numel() for p in model.parameters() if not p.requires_grad)}


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that train (``requires_grad``), by their state-dict names (tied weights once)."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict(keep_vars=True)
    return {k: v.detach() for k, v in state.items() if id(v) in names and names[id(v)] == k}


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: str = "state") -> None:
    own = trainable_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConfigError(f"{where} does not fit the model's trainable tensors: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]} (was it made for another base model or config?)")
    with torch.no_grad():
        for k, v in state.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ConfigError(f"{where}: tensor {k!r} has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(own[k].shape)} (another base model?)")
            own[k].copy_(v.to(own[k].dtype))


def save_trainable(model: nn.Module, folder: str | os.PathLike, config: Config, overwrite: bool = False) -> Path:
    """Write ``config`` and the model's trainable tensors into a new folder (atomically)."""
    state = {k: v.contiguous() for k, v in trainable_state_dict(model).items()}
    if not state:
        raise ConfigError("the model has no trainable tensors to save; apply a fine-tuning config first")
    meta = {"format": "pt", "efficientml.base": json.dumps(_signature(model))}
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(config.to_json(indent=2) + "\n")
        save_state_dict(tmp / WEIGHTS_FILE, state, metadata=meta)
    return Path(folder)


def _config_class(kind: str) -> type[Config]:
    from efficientml.finetune.registry import METHOD_CONFIGS

    if kind not in METHOD_CONFIGS:
        raise CheckpointError(f"method_config.json holds a config of kind {kind!r}; expected one of "
                              f"{', '.join(sorted(METHOD_CONFIGS))}")
    return METHOD_CONFIGS[kind]


def load_trainable(model: nn.Module, folder: str | os.PathLike, inplace: bool = True,
                   filter: Any = None) -> tuple[nn.Module, Config]:
    """Apply the saved config to ``model`` (a fresh base) and load the trained tensors into it."""
    folder = Path(folder)
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / f).is_file():
            raise DataNotFoundError(f"{str(folder)!r} is not a saved fine-tuning state: {f} is missing "
                                    f"(expected {CONFIG_FILE} + {WEIGHTS_FILE})")
    try:
        d = json.loads((folder / CONFIG_FILE).read_text())
    except ValueError as e:
        raise CheckpointError(f"{str(folder / CONFIG_FILE)!r} is not valid JSON ({e})") from None
    config = _config_class(d.get("__kind__", "?")).from_dict(d)
    model = apply(model, config, filter=filter, inplace=inplace).model
    want = json.loads(read_metadata(folder / WEIGHTS_FILE).get("efficientml.base", "{}"))
    if want and want != _signature(model):
        raise ConfigError(f"the state in {str(folder)!r} was made for another base model: its frozen "
                          f"parameters were {want}, this model's are {_signature(model)}")
    load_trainable_state_dict(model, load_state_dict(folder / WEIGHTS_FILE), where=f"state {str(folder)!r}")
    return model, config
