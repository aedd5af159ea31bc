"""Saving and loading physically pruned zoo models.

A pruned model's state dict no longer fits the zoo architecture it came from; the checkpoint records
the zoo name and kwargs (as any efficientml checkpoint) plus ``pruned: {...}`` with the channel counts
of weightless layers, and :func:`load_pruned` rebuilds the zoo model at the saved shapes. The file is
plain safetensors: any tool can read the tensors, and ``torch.save(model)`` of the pruned module works
without efficientml's masking code (there is none left in it).
"""

from __future__ import annotations

import os
from typing import Any

import torch.nn as nn

from efficientml.core.errors import CheckpointError
from efficientml.prune.surgery import channel_attrs, resize_like


def save_pruned(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> None:
    from efficientml.train import save_checkpoint

    if "model" not in meta:
        raise CheckpointError("meta must name the zoo model ('model') the pruned network came from")
    save_checkpoint(path, model, {**meta, "pruned": {"channel_attrs": channel_attrs(model)}})


def load_pruned(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    from efficientml.core.serialization import load_state_dict
    from efficientml.models import build_model
    from efficientml.train.checkpoint import read_checkpoint_meta

    meta = read_checkpoint_meta(path)
    state = load_state_dict(path)
    model = build_model(meta["model"], **meta.get("model_kwargs", {}))
    resize_like(model, state, (meta.get("pruned") or {}).get("channel_attrs"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{str(path)!r} does not fit the rebuilt model: missing {list(missing)[:4]}, "
                              f"unexpected {list(unexpected)[:4]}")
    return model, meta
