"""Checkpoints: weights as safetensors, with a JSON metadata block that says how to rebuild the
model (zoo name + kwargs) and how it was trained. Written atomically. Optimizer state for resuming
goes to a second safetensors file beside it (``<name>.optim.safetensors``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from efficientml.core.errors import CheckpointError
from efficientml.core.serialization import load_state_dict, read_metadata, save_state_dict, write_json

META_KEY = "efficientml"


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Save weights + metadata. ``meta`` should hold ``model`` (zoo name) and ``model_kwargs``.

    A JSON copy of the metadata is written next to the weights (``<path>.json``) for people."""
    path = Path(path)
    save_state_dict(path, model.state_dict(), metadata={META_KEY: json.dumps(meta)})
    write_json(path.with_suffix(path.suffix + ".json"), meta)
    if optimizer is not None:
        state = optimizer.state_dict()
        tensors = {f"state.{pid}.{k}": v for pid, st in state["state"].items()
                   for k, v in st.items() if isinstance(v, torch.Tensor)}
        scalars = {str(pid): {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
                   for pid, st in state["state"].items()}
        save_state_dict(_optim_path(path), tensors, metadata={
            "param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)})
    return path


def _optim_path(path: Path) -> Path:
    return path.with_name(path.name.replace(".safetensors", "") + ".optim.safetensors")


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    try:
        md = read_metadata(path)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors checkpoint ({e})") from None
    if META_KEY not in md:
        raise CheckpointError(f"{str(path)!r} has no efficientml metadata; expected a checkpoint "
                              "written by efficientml.train.save_checkpoint")
    return json.loads(md[META_KEY])


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None,
                    device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint; builds the zoo model from its metadata unless ``model`` is given."""
    meta = read_checkpoint_meta(path)
    if model is None:
        from efficientml.models import build_model

        if "model" not in meta:
            raise CheckpointError(f"{str(path)!r} does not name its model; pass model= to load it")
        model = build_model(meta["model"], **meta.get("model_kwargs", {}))
    state = load_state_dict(path, device=device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{str(path)!r} does not fit the model: missing {list(missing)[:5]}, "
                              f"unexpected {list(unexpected)[:5]}")
    return model.to(device), meta


def load_optimizer_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer) -> None:
    p = _optim_path(Path(path))
    tensors = load_state_dict(p)
    md = read_metadata(p)
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    for pid, sc in json.loads(md["scalars"]).items():
        state.setdefault(int(pid), {}).update(sc)
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(md["param_groups"])})
