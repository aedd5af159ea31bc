"""A Hugging Face folder's files: which weight files to read (safetensors or ``pytorch_model*.bin``,
sharded or not) and its configuration (config.json, with generation_config.json's extra stop tokens).

Below :mod:`~efficientml.llm.io.hub` (which checks a snapshot's shards) and
:mod:`~efficientml.llm.io.load`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from efficientml.core.errors import CheckpointError
from efficientml.llm.config import LlamaConfig


# a folder's weights: safetensors first, PyTorch pickles (older Hub repos) when there are none
WEIGHT_FORMATS = (("safetensors", "model.safetensors.index.json", "model.safetensors", "*.safetensors"),
                  ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin"))


def weight_files(folder: Path, check: bool = True) -> tuple[str, list[Path]]:
    """("safetensors" or "bin", the files to read): the shards an index lists, else the single file,
    else every file of the kind. ``check``: a shard the index names but the folder lacks is an error
    (without it, the caller sees which are missing: a partly downloaded Hub snapshot)."""
    for kind, index_name, single, pattern in WEIGHT_FORMATS:
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = [folder / f for f in dict.fromkeys(weight_map.values())]
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{str(index)!r} is not a valid {kind} index ({e})") from None
        elif (folder / single).is_file():
            files = [folder / single]
        else:
            files = sorted(folder.glob(pattern))
        if files:
            missing = [f for f in files if not f.is_file()]
            if check and missing:
                raise CheckpointError(f"shard {str(missing[0])!r} named in the index does not exist")
            return kind, files
    raise CheckpointError(f"{str(folder)!r} has no weights: expected *.safetensors (or pytorch_model*.bin)")


def hf_config(folder: Path) -> LlamaConfig:
    """A Hugging Face folder's config.json, with the end-of-turn tokens chat models list in
    generation_config.json (Llama-3: <|eot_id|> next to <|end_of_text|>) joined to its EOS:
    generation stops on every one of them."""
    cfg = LlamaConfig.from_json(folder / "config.json")
    gc = folder / "generation_config.json"
    try:
        extra = json.loads(gc.read_text()).get("eos_token_id") if gc.is_file() else None
    except (OSError, ValueError, AttributeError):
        extra = None  # an unreadable generation_config only loses the extra stop tokens
    extra = [extra] if isinstance(extra, int) else extra if isinstance(extra, list) else []
    ids = list(dict.fromkeys(cfg.eos_token_ids + [int(x) for x in extra if isinstance(x, int)]))
    if ids == cfg.eos_token_ids:
        return cfg
    return dataclasses.replace(cfg, eos_token_id=ids[0] if len(ids) == 1 else ids)
