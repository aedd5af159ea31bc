"""Write a model as a GGUF file that llama.cpp (and transformers' GGUF loader) can run: the metadata
llama.cpp's converter writes, the tokenizer, and the weights in F32, F16, BF16, Q8_0, Q4_0 or Q4_1,
Q/K rows in llama.cpp's interleaved-pair order.

    save_gguf(model, tokenizer, "model.gguf", outtype="q8_0")

What is written, as llama.cpp's ``convert_hf_to_gguf.py`` does:

- ``general.architecture`` from the family's entry (:attr:`efficientml.llm.arch.Family.gguf`): ``llama``
  (Llama, Mistral without a sliding window, SmolLM), ``qwen2``, ``qwen3``, ``phi3`` or ``granite`` (its
  multipliers as ``*_scale``), and the ``{arch}.*`` shapes:
  context length, width, blocks, FFN width, heads, KV heads, key/value length, RMSNorm epsilon, RoPE
  base and dimension, linear RoPE scaling.
  Llama-3.1-style RoPE scaling becomes the ``rope_freqs.weight`` tensor (one divisor per frequency).
  Phi-3 (float weights): q/k/v fused as ``attn_qkv`` and gate/up as ``ffn_up``, the rotary dimension,
  the sliding window, LongRoPE's factors as ``rope_factors_long/short`` tensors with the pretrained
  context and attention factor.
- Norm weights and biases (1-D tensors) stay F32; matrices take ``outtype``. The block formats encode
  as ggml's reference quantizers do (byte for byte, tested against the gguf package's): per block of
  32 weights, Q8_0 an fp16 scale ``d = max|w| / 127`` and int8 codes ``round(w / d)``; Q4_0 ``d`` =
  (the weight of largest magnitude) / −8 and codes 0…15 around 8; Q4_1 ``d = (max − min) / 15``, the
  minimum and codes 0…15 (two per byte). With Q4_0/Q4_1 the embedding and output matrices are written
  Q8_0, as llama.cpp's quantizer keeps them above 4 bits. A matrix whose rows are not a multiple of 32
  long is written F16.
- A byte-level BPE tokenizer (``tokenizer.ggml.model`` ``gpt2``): tokens in id order with their types
  (normal, control for special added tokens, user-defined for other added tokens, unused for
  padding up to the model's vocabulary), merges, and the ``tokenizer.ggml.pre`` name of its split
  (GPT-2, SmolLM's digit split, Llama-3, Qwen2 or Tekken regex; another split is refused, since
  llama.cpp would tokenize differently). A SentencePiece tokenizer that came from a GGUF file is
  written back with its scores. BOS/EOS/EOT/padding ids, ``add_bos_token`` and the chat template.

Quantized linears (:class:`~efficientml.llm.kernels.qlinear.QuantLinear`, from RTN / AWQ / GPTQ)
whose grid is a GGUF block format are written in it *exactly*, whatever ``outtype`` says: symmetric
4-bit with groups of 32 is Q4_0 (``d`` = the group's fp16 scale, code ``q`` = our code; llama.cpp's
``d·(q − 8)`` is our ``s·(q − 8)``), symmetric 8-bit with groups of 32 is Q8_0. Other grids
(asymmetric, other group sizes, 2/3 bits) have no exact GGUF block and are refused rather than
re-quantized behind the user's back; so are W8A8 and other swapped modules, sliding-window
attention outside phi3, q/k norms outside qwen3, ALiBi, and dynamic-NTK and YaRN RoPE scaling.
The file is written atomically (temporary file + rename), tensors one at a time.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from efficientml.core.errors import CheckpointError, ConfigError, UnsupportedError
from efficientml.core.serialization import atomic_path
from efficientml.llm import arch as families
from efficientml.llm.config import LlamaConfig
from efficientml.llm.io.generation_config import GGUF_SAMPLING
from efficientml.llm.io.ggml_encode import BLOCK_BYTES, nbytes, qlinear_bytes, tensor_bytes
from efficientml.llm.io.gguf import _SCALARS, _TOP_NAMES, layer_names, permute_rope_rows
from efficientml.llm.io.gguf_tokenizer import tokenizer_metadata
from efficientml.llm.io.tokenizer import Tokenizer

OUTTYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3}  # → GGML tensor type
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32, "q4_0": 2, "q4_1": 3}  # general.file_type (llama_ftype)
_ALIGN = 32
# GGUF value types
_U32, _I32, _F32, _BOOL, _STR, _ARR, _U64 = 4, 5, 6, 7, 8, 9, 10

_GGUF_TOP = {v: k for k, v in _TOP_NAMES.items()}
__all__ = ["OUTTYPES", "gguf_name", "model_metadata", "sampling_metadata", "save_gguf"]


def gguf_name(hf: str, arch: str | families.Family = "llama") -> str:
    """``model.layers.3.self_attn.q_proj.weight`` → ``blk.3.attn_q.weight`` (inverse of gguf.hf_name)
    for a family (or the family a GGUF architecture name reads as); fused projections by their GGUF
    names (phi3: ``self_attn.qkv_proj`` → ``attn_qkv``, ``mlp.gate_up_proj`` → ``ffn_up``)."""
    fam = arch if isinstance(arch, families.Family) else families.by_gguf(arch)[0]
    layer = {v: k for k, v in layer_names(fam).items()}
    parts = hf.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) >= 5:
        inner = ".".join(parts[3:-1])
        if inner in layer:
            return f"blk.{parts[2]}.{layer[inner]}.{parts[-1]}"
    top = ".".join(parts[:-1])
    if top in _GGUF_TOP:
        return f"{_GGUF_TOP[top]}.{parts[-1]}"
    raise UnsupportedError(f"weight {hf!r} has no GGUF name (not part of a Llama/Qwen model)")


def gguf_family(cfg: LlamaConfig) -> families.Family:
    """The family ``cfg`` is written as, after refusing what its GGUF form cannot hold."""
    if cfg.position_embedding != "rope":
        raise UnsupportedError("ALiBi models have no GGUF form here (llama.cpp's llama and qwen architectures "
                               "use RoPE)")
    fam = cfg.family
    g = fam.gguf
    if g is None:
        raise UnsupportedError(f"model_type {cfg.model_type!r} has no GGUF form; give its entry in "
                               f"{families.family.WHERE} a GGUFForm")
    if cfg.rope_type not in g.rope_types:
        raise UnsupportedError(f"RoPE scaling {cfg.rope_type!r} is not written to a {g.arch} GGUF; "
                               f"{', '.join(g.rope_types)} are")
    if cfg.partial_rotary_factor != 1.0 and not g.rope_dim_is_rotary:
        raise UnsupportedError(f"partial rotary embeddings are not written to a {g.arch} GGUF; they are for "
                               f"{_archs_with(lambda f: f.rope_dim_is_rotary)} models")
    if cfg.sliding_window is not None and "sliding_window" not in g.keys:
        raise UnsupportedError(f"sliding-window attention ({cfg.sliding_window}) is not written: llama.cpp's "
                               f"{g.arch} architecture would attend to the whole context")
    if cfg.hidden_act != "silu" or cfg.o_bias or cfg.mlp_bias:
        raise UnsupportedError("only SwiGLU (silu) blocks without output/MLP biases are written to GGUF")
    if cfg.qk_norm != g.qk_norm:
        raise UnsupportedError(f"qk_norm={cfg.qk_norm} does not fit a {g.arch} GGUF; q/k norms are written for "
                               f"{_archs_with(lambda f: f.qk_norm)} models only, and always")
    if cfg.attention_bias and not g.qkv_bias:
        raise UnsupportedError(f"q/k/v biases in a {g.arch}-architecture model are not written to GGUF")
    return fam


def _archs_with(has) -> str:
    return " / ".join(dict.fromkeys(f.gguf.arch for f in families.entries() if f.gguf is not None and has(f.gguf)))


def model_metadata(cfg: LlamaConfig, fam: families.Family, outtype: str, name: str) -> dict[str, Any]:
    g = fam.gguf
    arch, hd = g.arch, cfg.dim_per_head
    meta: dict[str, Any] = {
        "general.architecture": arch, "general.name": name, "general.file_type": _FILE_TYPE[outtype],
        "general.alignment": _ALIGN,
        f"{arch}.context_length": cfg.max_position_embeddings, f"{arch}.embedding_length": cfg.hidden_size,
        f"{arch}.block_count": cfg.num_hidden_layers, f"{arch}.feed_forward_length": cfg.intermediate_size,
        f"{arch}.attention.head_count": cfg.num_attention_heads,
        f"{arch}.attention.head_count_kv": cfg.num_key_value_heads,
        f"{arch}.attention.key_length": hd, f"{arch}.attention.value_length": hd,
        f"{arch}.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        f"{arch}.rope.freq_base": float(cfg.rope_theta), f"{arch}.rope.dimension_count": hd,
        f"{arch}.vocab_size": cfg.vocab_size,
    }
    if cfg.rope_type == "linear":
        meta[f"{arch}.rope.scaling.type"] = "linear"
        meta[f"{arch}.rope.scaling.factor"] = float(cfg.rope_scaling["factor"])  # type: ignore[index]
    if g.rope_dim_is_rotary:  # as llama.cpp's phi3: the rotary part of the head
        meta[f"{arch}.rope.dimension_count"] = cfg.rotary_dim
    for field, key in g.keys.items():  # the family's own keys (granite's *_scale, the window)
        v = cfg.attention_scale if field == "attention_multiplier" else getattr(cfg, field)
        if v is not None:
            meta[f"{arch}.{key}"] = int(v) if field == "sliding_window" else float(v)
    if cfg.rope_type == "longrope":  # LongRoPE's pretrained context and attention factor (its factors: tensors)
        from efficientml.llm.rope import rope_inv_freq

        meta[f"{arch}.rope.scaling.original_context_length"] = cfg.rope_original_context
        meta[f"{arch}.rope.scaling.attn_factor"] = float(rope_inv_freq(cfg)[1])
    return meta


_SAMPLING_KEYS = {field: key for key, field in GGUF_SAMPLING.items()}  # SamplingConfig field → GGUF key


def sampling_metadata(sampling: dict[str, Any]) -> dict[str, Any]:
    """SamplingConfig fields → ``general.sampling.*`` (top-k an int32, the rest float32, as llama.cpp)."""
    unknown = set(sampling) - set(_SAMPLING_KEYS)
    if unknown:
        raise ConfigError(f"sampling defaults {sorted(unknown)} have no GGUF key; "
                          f"expected some of {list(_SAMPLING_KEYS)}")
    return {_SAMPLING_KEYS[k]: np.int32(v) if k == "top_k" else float(v) for k, v in sampling.items()}


# --- the container ---------------------------------------------------------------------------------

def _pack_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value_type(v: Any) -> int:
    if isinstance(v, bool):
        return _BOOL
    if isinstance(v, np.int32):
        return _I32
    if isinstance(v, int):
        return _U32 if 0 <= v < 2 ** 32 else _U64 if v >= 0 else _I32
    if isinstance(v, float):
        return _F32
    if isinstance(v, str):
        return _STR
    raise ConfigError(f"no GGUF value type for {type(v).__name__}")


def _pack_value(v: Any) -> bytes:
    if isinstance(v, list):
        if not v:
            return struct.pack("<II", _ARR, _I32) + struct.pack("<Q", 0)
        it = _I32 if all(isinstance(x, int) and not isinstance(x, bool) for x in v) else _value_type(v[0])
        head = struct.pack("<II", _ARR, it) + struct.pack("<Q", len(v))
        if it == _STR:
            return head + b"".join(_pack_string(x) for x in v)
        return head + np.asarray(v, dtype=np.dtype(_SCALARS[it].replace("?", "b1"))).tobytes()
    t = _value_type(v)
    if t == _STR:
        return struct.pack("<I", t) + _pack_string(v)
    return struct.pack("<I", t) + struct.pack(_SCALARS[t], v)


_PLAIN_MODULES = {"LlamaForCausalLM", "LlamaModel", "DecoderLayer", "Attention", "MLP", "RMSNorm", "Rotary",
                  "Linear", "Embedding", "ModuleList", "GemvLinear", "PackedProjections"}  # the last two: kernel swaps


def _exact_block_type(mod: nn.Module, name: str) -> int:
    """The GGUF block type that holds a QuantLinear's grid exactly (Q4_0 / Q8_0), else an error."""
    spec, g = mod.spec, mod.in_features // mod.weight_scale.shape[1]
    if spec.symmetric and g == 32 and spec.bits in (4, 8):
        return 2 if spec.bits == 4 else 8
    raise UnsupportedError(
        f"{name} is quantized {spec.bits}-bit {'symmetric' if spec.symmetric else 'asymmetric'} with groups of "
        f"{g}; GGUF holds exactly only symmetric 4-bit (Q4_0) or 8-bit (Q8_0) groups of 32. Quantize with "
        "symmetric=True, group_size=32, or write this model with save_hf (compressed-tensors layout)")


def _plan(model: nn.Module, fam: families.Family, outtype: str) -> list[tuple[str, Any, tuple[int, ...], int]]:
    """(gguf name, state-dict key / a computed tensor / a QuantLinear, PyTorch shape, ggml type) for
    every tensor."""
    from efficientml.llm.rope import rope_inv_freq

    cfg: LlamaConfig = model.config
    quantized = {}  # state-dict prefix → (module, exact GGUF block type)
    for name, mod in model.named_modules():
        if type(mod).__name__ in ("QuantLinear", "QuantLinearDequant", "QuantLinearTriton"):  # kernel swaps too
            quantized[name] = (mod, _exact_block_type(mod, name))
        elif type(mod).__name__ not in _PLAIN_MODULES:
            raise UnsupportedError(f"module {name!r} is a {type(mod).__name__}, not part of a plain Llama model: "
                                   "write it with save_hf, or merge/dequantize it first")
    plan = []
    if cfg.rope_type == "llama3":
        from dataclasses import replace

        plain = rope_inv_freq(replace(cfg, rope_scaling=None))[0].double()
        scaled = rope_inv_freq(cfg)[0].double()
        plan.append(("rope_freqs.weight", (plain / scaled).float(), (cfg.dim_per_head // 2,), 0))
    state = model.state_dict()
    fused = fam.fused_in_gguf()
    if fused:  # llama.cpp's phi3: q/k/v as one attn_qkv, gate/up as one ffn_up (gate rows first)
        if quantized:
            raise UnsupportedError(f"{next(iter(quantized))}: quantized linears are not fused into a "
                                   f"{fam.gguf.arch} GGUF; dequantize first")
        from efficientml.llm.io.fused import fuse_split

        state = fuse_split(cfg, state, fused)
    for key, t in state.items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        prefix, leaf = key.rsplit(".", 1)
        if prefix in quantized:
            mod, kind = quantized[prefix]
            if leaf == "weight_packed":
                plan.append((gguf_name(f"{prefix}.weight", fam), mod, (mod.out_features, mod.in_features), kind))
            elif leaf == "bias":
                plan.append((gguf_name(key, fam), key, tuple(t.shape), 0))
            continue
        shape = tuple(t.shape)
        kind = OUTTYPES[outtype]
        if t.dim() == 1:
            kind = 0
        elif kind in BLOCK_BYTES and shape[-1] % 32:
            kind = 1  # as llama.cpp does: rows that do not fill whole blocks fall back to F16
        elif kind in (2, 3) and key in ("model.embed_tokens.weight", "lm_head.weight"):
            kind = 8  # embeddings and output above 4 bits, as llama.cpp's quantizer keeps them
        plan.append((gguf_name(key, fam), t if fused else key, shape, kind))  # fused: computed tensors
    if cfg.rope_type == "longrope":  # LongRoPE's factors as tensors (phi3)
        for key, name in (("long_factor", "rope_factors_long.weight"),
                          ("short_factor", "rope_factors_short.weight")):
            f = torch.tensor(cfg.rope_scaling[key], dtype=torch.float32)  # type: ignore[index]
            plan.append((name, f, tuple(f.shape), 0))
    return plan


def save_gguf(model: nn.Module, tokenizer: Tokenizer | None, path: str | Path, outtype: str = "f16",
              overwrite: bool = False, name: str | None = None, sampling: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (+ ``tokenizer``, needed by llama.cpp) as a GGUF v3 file; see the module
    docstring for what is written and refused. ``sampling``: the model's sampling defaults
    (:func:`~efficientml.llm.io.generation_config.generation_defaults`), written as llama.cpp's converter writes them
    (``general.sampling.*``). Returns the path."""
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise ConfigError(f"GGUF outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{str(path)!r} exists; pass overwrite=True (--overwrite) to replace it")
    if tokenizer is None:
        raise ConfigError("a GGUF file carries its tokenizer: pass the tokenizer the model was loaded with")
    cfg: LlamaConfig = model.config
    fam = gguf_family(cfg)
    meta = model_metadata(cfg, fam, outtype, name or path.stem)
    meta.update(tokenizer_metadata(tokenizer, cfg.vocab_size, cfg))
    meta.update(sampling_metadata(sampling or {}))
    plan = _plan(model, fam, outtype)
    state = model.state_dict()

    infos, offset = [], 0
    for gname, _, shape, kind in plan:
        dims = tuple(reversed(shape))  # GGUF lists the fastest-varying dimension first
        infos.append(_pack_string(gname) + struct.pack("<I", len(dims))
                     + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", kind, offset))
        offset += -(-nbytes(shape, kind) // _ALIGN) * _ALIGN
    header = b"GGUF" + struct.pack("<IQQ", 3, len(plan), len(meta))
    header += b"".join(_pack_string(k) + _pack_value(v) for k, v in meta.items()) + b"".join(infos)

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header)
        _pad(f)
        for gname, src, shape, kind in plan:
            heads = None
            if fam.gguf.permute_qk and (".attn_q." in gname or ".attn_k." in gname):
                heads = cfg.num_attention_heads if ".attn_q." in gname else cfg.num_key_value_heads
            if isinstance(src, nn.Module):  # a QuantLinear: its own codes and scales, exactly
                f.write(qlinear_bytes(src, kind, heads).tobytes())
                _pad(f)
                continue
            w = src if isinstance(src, torch.Tensor) else state[src]
            w = w.detach().to("cpu", torch.float32)
            if heads is not None:
                w = permute_rope_rows(w, heads)
            f.write(tensor_bytes(w, kind).tobytes())
            _pad(f)
    return path


def _pad(f: BinaryIO) -> None:
    f.write(b"\0" * (-f.tell() % _ALIGN))
