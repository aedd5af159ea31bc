"""Safe writes: every file goes to a temporary name in the same folder and is renamed into place,
so a crash never leaves half a checkpoint. Folders are built beside the target and renamed too."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from efficientml.core.errors import CheckpointError, EfficientMLError, OutputError
from efficientml.core.paths import require_file
from efficientml.core.outputs import check_output, clean_stale, normalize, tmp_prefix, why


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it.

    Leftovers of killed writers to the same target are deleted first (core/outputs.py); an OS error
    while writing (disk full, read-only, …) becomes one :class:`OutputError` sentence."""
    path = normalize(path)
    _mkdir(path.parent)
    clean_stale(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {str(path)!r} ({why(e)})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
            os.replace(tmp_path, path)
        except OSError as e:
            if isinstance(e, EfficientMLError):
                raise
            raise OutputError(f"cannot write {str(path)!r} ({why(e)})") from e
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create folder {str(folder)!r} ({why(e)})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it becomes ``path``.

    Refuses an existing ``path`` unless ``overwrite``, and even then refuses a folder holding files
    efficientml does not write (or the current folder): the old folder is moved aside and deleted
    only after the new one is in place."""
    path = check_output(path, overwrite=overwrite, folder=True, flag="output folder")
    _mkdir(path.parent)
    clean_stale(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(path), suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise OutputError(f"cannot write {str(path)!r} ({why(e)})") from None
    try:
        try:
            yield tmp
            _publish(tmp, path)
        except OSError as e:
            if isinstance(e, EfficientMLError):
                raise
            raise OutputError(f"cannot write {str(path)!r} ({why(e)})") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, path: Path) -> None:
    """Give ``tmp`` and its files the usual modes, then rename it onto ``path`` (the old one aside)."""
    mask = _umask()
    for f in tmp.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700
    if not path.exists():
        os.replace(tmp, path)
        return
    old = tmp.with_name(tmp.name[: -len(".tmp")] + ".old.tmp")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def save_state_dict(path: str | os.PathLike, state: dict[str, torch.Tensor],
                    metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors, atomically. Shared/aliased tensors are cloned."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().clone() if _shares(v) else v.detach().contiguous()
               for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _shares(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def load_state_dict(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = require_file(path, "checkpoint file")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({e})") from e


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
