"""Finding and loading pretrained weights shipped as files named ``<stem>-<sha256 prefix>.<ext>``.

Search order: the folders of :func:`efficientml.data.paths.models_roots` (``EFFICIENTML_MODELS``,
then ``../shared/models``), then the download cache, then the public URL (offline this fails with a
message naming the file expected and ``EFFICIENTML_MODELS``). The sha256 prefix in the file name is
checked before the file is trusted.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from efficientml.core.errors import CheckpointError, DataNotFoundError
from efficientml.data import paths


def find_weights(relpath: str, url: str | None = None) -> Path:
    """Return the verified path of ``relpath`` (e.g. ``"resnet-cifar10/resnet20-12fca82f.th"``)."""
    prefix = _sha_prefix(relpath)
    roots = paths.models_roots()
    for root in roots:
        p = Path(root) / relpath
        if p.is_file():
            return _verified(p, prefix)
    cached = paths.cache_dir() / "models" / relpath
    if cached.is_file():
        return _verified(cached, prefix)
    missing = (f"pretrained weights {relpath!r} not found: set EFFICIENTML_MODELS to a folder that "
               f"contains {relpath!r} (searched {', '.join(str(r) for r in roots)})")
    if url is None:
        raise DataNotFoundError(missing)
    try:
        paths.download(url, cached, None, relpath)
    except DataNotFoundError:
        raise DataNotFoundError(missing + f" and the download from {url} failed") from None
    try:
        return _verified(cached, prefix)
    except CheckpointError:
        cached.unlink(missing_ok=True)  # never keep a download whose hash does not match its name
        raise


def load_weights(model: nn.Module, path: str | os.PathLike, key: str | None = "state_dict",
                 strip_prefix: str = "module.") -> nn.Module:
    """Load a torch checkpoint into ``model`` (strict except for BN ``num_batches_tracked``)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types
        raise CheckpointError(f"{str(path)!r} is not a readable torch checkpoint ({e})") from None
    state = ckpt[key] if key is not None and isinstance(ckpt, dict) and key in ckpt else ckpt
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} holds no state dict (expected a dict under {key!r})")
    state = {k.removeprefix(strip_prefix): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{str(path)!r} does not fit {type(model).__name__}: missing {missing[:4]}, "
            f"unexpected {result.unexpected_keys[:4]}")
    return model


def _sha_prefix(relpath: str) -> str:
    stem = Path(relpath).name.split(".")[0]
    prefix = stem.rpartition("-")[2]
    if len(prefix) < 8 or any(c not in "0123456789abcdef" for c in prefix):
        raise CheckpointError(f"weights file name {relpath!r} carries no sha256 prefix")
    return prefix


def _verified(path: Path, prefix: str) -> Path:
    got = paths.sha256_file(path)
    if not got.startswith(prefix):
        raise CheckpointError(
            f"{str(path)!r} has sha256 {got[:12]}…, but its name promises {prefix}…; the file is "
            f"corrupt or not the expected weights")
    return path
