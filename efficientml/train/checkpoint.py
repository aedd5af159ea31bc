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
from efficientml.core.paths import require_file
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
        save_state_dict(optim_path(path), tensors, metadata={
            "param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)})
    return path


def optim_path(path: Path) -> Path:
    return path.with_name(path.name.replace(".safetensors", "") + ".optim.safetensors")


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = require_file(path, "checkpoint file")
    try:
        md = read_metadata(path)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors checkpoint ({e})") from None
    if META_KEY not in md:
        raise CheckpointError(f"{str(path)!r} has no efficientml metadata; expected a checkpoint "
                              "written by efficientml.train.save_checkpoint")
    return _parse_meta(md[META_KEY], path)


def _parse_meta(text: str, path: Path) -> dict[str, Any]:
    """The metadata block as a dict whose ``model``/``model_kwargs``/``pruned`` have usable types."""
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{str(path)!r} has malformed efficientml metadata (not JSON: {e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{str(path)!r} has efficientml metadata of type {type(meta).__name__}; "
                              "expected a JSON object")
    for key, typ in (("model", str), ("model_kwargs", dict), ("pruned", dict), ("train_config", dict)):
        if meta.get(key) is not None and not isinstance(meta[key], typ):
            raise CheckpointError(f"{str(path)!r} metadata {key!r} is a {type(meta[key]).__name__}; "
                                  f"expected a {'string' if typ is str else 'JSON object'}")
    if meta.get("model_kwargs") and not all(isinstance(k, str) for k in meta["model_kwargs"]):
        raise CheckpointError(f"{str(path)!r} metadata 'model_kwargs' must have string keys")
    return meta


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None,
                    device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint; builds the zoo model from its metadata unless ``model`` is given."""
    meta = read_checkpoint_meta(path)
    if model is None:
        from efficientml.models import build_model

        if "model" not in meta:
            raise CheckpointError(f"{str(path)!r} does not name its model; pass model= to load it")
        try:
            model = build_model(meta["model"], **(meta.get("model_kwargs") or {}))
        except TypeError as e:
            raise CheckpointError(f"{str(path)!r} metadata cannot rebuild model {meta['model']!r} ({e})") from None
    state = load_state_dict(path, device=device)
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if wrong:
        hint = ("; it holds a pruned model: load it with efficientml.prune.io.load_pruned"
                if meta.get("pruned") else "")
        raise CheckpointError(f"{str(path)!r} does not fit the model: tensor {wrong[0]!r} has shape "
                              f"{tuple(state[wrong[0]].shape)}, the model's is {tuple(own[wrong[0]].shape)}{hint}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{str(path)!r} does not fit the model: missing {list(missing)[:5]}, "
                              f"unexpected {list(unexpected)[:5]}")
    return model.to(device), meta


def load_optimizer_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer) -> None:
    p = optim_path(Path(path))
    tensors = load_state_dict(p)
    try:
        md = read_metadata(p)
        state: dict[int, dict[str, Any]] = {}
        for key, v in tensors.items():
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
        for pid, sc in json.loads(md["scalars"]).items():
            state.setdefault(int(pid), {}).update(sc)
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(md["param_groups"])})
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"optimizer state {str(p)!r} is malformed or does not fit this model and "
                              f"optimizer ({type(e).__name__}: {e}); train without --resume or from a "
                              "matching checkpoint") from None
