"""Write a model as a GGUF file that llama.cpp (and transformers' GGUF loader) can run: the metadata
llama.cpp's converter writes, the tokenizer, and the weights in F32, F16, BF16, Q8_0, Q4_0 or Q4_1,
Q/K rows in llama.cpp's interleaved-pair order.

    save_gguf(model, tokenizer, "model.gguf", outtype="q8_0")

What is written, as llama.cpp's ``convert_hf_to_gguf.py`` does:

- ``general.architecture`` ``llama`` (Llama, Mistral without a sliding window, SmolLM), ``qwen2``,
  ``qwen3``, ``phi3`` or ``granite`` (its multipliers as ``*_scale``), and the ``{arch}.*`` shapes:
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
attention outside phi3, ALiBi, and dynamic-NTK and YaRN RoPE scaling. The file is written atomically (temporary
file + rename), tensors one at a time.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from efficientml.core.errors import CheckpointError, ConfigError, UnsupportedError
from efficientml.core.serialization import atomic_path
from efficientml.llm.config import LlamaConfig
from efficientml.llm.io.generation_config import GGUF_SAMPLING
from efficientml.llm.io.gguf import _LAYER_NAMES, _PHI3_LAYER_NAMES, _SCALARS, _TOP_NAMES, permute_rope_rows
from efficientml.llm.io.tokenizer import _LLAMA3_SPLIT, _QWEN2_SPLIT, _TEKKEN_SPLIT, Tokenizer

OUTTYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3}  # → GGML tensor type
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32, "q4_0": 2, "q4_1": 3}  # general.file_type (llama_ftype)
_BLOCK_BYTES = {8: 34, 2: 18, 3: 20}  # bytes per block of 32 weights
_ALIGN = 32
# GGUF value types
_U32, _I32, _F32, _BOOL, _STR, _ARR, _U64 = 4, 5, 6, 7, 8, 9, 10

_GGUF_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_GGUF_LAYER_PHI3 = {v: k for k, v in _PHI3_LAYER_NAMES.items()}
_GGUF_TOP = {v: k for k, v in _TOP_NAMES.items()}


def gguf_name(hf: str, arch: str = "llama") -> str:
    """``model.layers.3.self_attn.q_proj.weight`` → ``blk.3.attn_q.weight`` (inverse of gguf.hf_name;
    phi3: ``self_attn.qkv_proj`` → ``attn_qkv``, ``mlp.gate_up_proj`` → ``ffn_up``)."""
    parts = hf.split(".")
    layer = _GGUF_LAYER_PHI3 if arch == "phi3" else _GGUF_LAYER
    if parts[:2] == ["model", "layers"] and len(parts) >= 5:
        inner = ".".join(parts[3:-1])
        if inner in layer:
            return f"blk.{parts[2]}.{layer[inner]}.{parts[-1]}"
    top = ".".join(parts[:-1])
    if top in _GGUF_TOP:
        return f"{_GGUF_TOP[top]}.{parts[-1]}"
    raise UnsupportedError(f"weight {hf!r} has no GGUF name (not part of a Llama/Qwen model)")


def _blocks(w: torch.Tensor) -> np.ndarray:
    return w.detach().to("cpu", torch.float32).contiguous().numpy().reshape(-1, 32)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(blocks, 32) codes 0…15 → (blocks, 16) bytes: weight j in the low nibble, j + 16 in the high."""
    q = q.astype(np.uint8)
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def quantize_q8_0(w: torch.Tensor) -> np.ndarray:
    """(rows, cols) float, cols a multiple of 32 → Q8_0 bytes: per block of 32, fp16 d then 32 int8."""
    x = _blocks(w)
    d = (np.abs(x).max(1, keepdims=True) / np.float32(127)).astype(np.float32)
    v = x * _inverse(d)
    q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))  # C roundf: halves away from zero
    return np.concatenate([_f16_bytes(d), q.astype(np.int8).view(np.uint8)], 1).reshape(-1)


def quantize_q4_0(w: torch.Tensor) -> np.ndarray:
    """Q4_0: per block of 32, fp16 d = (the weight of largest magnitude) / −8, codes ⌊w/d + 8.5⌋ ≤ 15."""
    x = _blocks(w)
    peak = np.take_along_axis(x, np.abs(x).argmax(1)[:, None], 1)  # signed
    d = (peak / np.float32(-8)).astype(np.float32)
    q = np.minimum(np.trunc(x * _inverse(d) + np.float32(8.5)), 15)
    return np.concatenate([_f16_bytes(d), _nibbles(q)], 1).reshape(-1)


def quantize_q4_1(w: torch.Tensor) -> np.ndarray:
    """Q4_1: per block of 32, fp16 d = (max − min) / 15, fp16 min, codes ⌊(w − min)/d + 0.5⌋ ≤ 15."""
    x = _blocks(w)
    lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
    d = ((hi - lo) / np.float32(15)).astype(np.float32)
    q = np.minimum(np.trunc((x - lo) * _inverse(d) + np.float32(0.5)), 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _nibbles(q)], 1).reshape(-1)


def _arch(cfg: LlamaConfig) -> str:
    if cfg.position_embedding != "rope":
        raise UnsupportedError("ALiBi models have no GGUF form here (llama.cpp's llama and qwen architectures "
                               "use RoPE)")
    if cfg.model_type == "phi3":  # llama.cpp's phi3: fused attn_qkv / ffn_up, sliding window, LongRoPE
        if cfg.rope_type not in ("default", "longrope"):
            raise UnsupportedError(f"RoPE scaling {cfg.rope_type!r} is not written for phi3; default and "
                                   "longrope are")
        if cfg.attention_bias or cfg.mlp_bias or cfg.o_bias or cfg.qk_norm or cfg.hidden_act != "silu":
            raise UnsupportedError("a phi3 GGUF holds plain SwiGLU blocks without biases or q/k norms")
        return "phi3"
    if cfg.partial_rotary_factor != 1.0:
        raise UnsupportedError("partial rotary embeddings are written to GGUF only for phi3 models")
    if cfg.sliding_window is not None:
        raise UnsupportedError(f"sliding-window attention ({cfg.sliding_window}) is not written: llama.cpp's "
                               "llama architecture would attend to the whole context")
    if cfg.rope_type not in ("default", "linear", "llama3"):
        raise UnsupportedError(f"RoPE scaling {cfg.rope_type!r} is not written to GGUF; default, linear and "
                               "llama3 are")
    if cfg.hidden_act != "silu" or cfg.o_bias or cfg.mlp_bias:
        raise UnsupportedError("only SwiGLU (silu) blocks without output/MLP biases are written to GGUF")
    if cfg.model_type == "qwen3" or cfg.qk_norm:
        return "qwen3"
    if cfg.model_type == "qwen2":
        return "qwen2"
    if cfg.attention_bias:
        raise UnsupportedError("q/k/v biases in a llama-architecture model are not written to GGUF")
    return "granite" if cfg.model_type == "granite" else "llama"


def _pre_name(pre: dict | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a tokenizer.json pre-tokenizer; refuse unknown splits."""
    if pre is None:
        raise UnsupportedError("the tokenizer has no pre-tokenizer; llama.cpp's byte-level BPE needs one")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        kinds = [s.get("type") for s in steps]
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
                and steps[1].get("use_regex", True):
            return "smollm"
        if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
            regex = steps[0].get("pattern", {}).get("Regex")
            for name, split in (("llama-bpe", _LLAMA3_SPLIT), ("qwen2", _QWEN2_SPLIT), ("tekken", _TEKKEN_SPLIT)):
                if regex == split:
                    return name
    raise UnsupportedError(f"the tokenizer splits text with {json.dumps(pre)[:200]}, which has no llama.cpp "
                           "pre-tokenizer name here; known: GPT-2, SmolLM digits, Llama-3, Qwen2, Tekken")


def _normalizes(spec: dict | None) -> bool:
    """Whether a tokenizer.json normalizer does more than SentencePiece's escaping and dummy prefix
    (which llama.cpp's "llama" tokenizer does itself)."""
    steps = (spec or {}).get("normalizers", [spec] if spec else [])
    return any(st.get("type") not in ("Replace", "Prepend") or
               (st.get("type") == "Replace" and st.get("pattern", {}).get("String") != " ") for st in steps)


def tokenizer_metadata(tok: Tokenizer, vocab_size: int, cfg: LlamaConfig) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` keys for ``tok``, padded to the model's ``vocab_size``."""
    spec = json.loads(tok.backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UnsupportedError(f"tokenizer model {model.get('type')!r} is not written to GGUF; BPE is")
    vocab: dict[str, int] = dict(model.get("vocab", {}))
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    for i, a in added.items():
        vocab.setdefault(a["content"], i)
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise ConfigError(f"the tokenizer has {n} tokens but the model's vocabulary is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [5] * vocab_size  # unused until filled
    for t, i in vocab.items():
        tokens[i] = t
        types[i] = 1
    for i, a in added.items():
        types[i] = 3 if a.get("special") else 4
    meta: dict[str, Any] = {}
    if model.get("byte_fallback") or getattr(tok, "gguf_scores", None) is not None:
        # SentencePiece-style BPE: llama.cpp's "llama" tokenizer, with scores
        scores = getattr(tok, "gguf_scores", None)
        if scores is None or len(scores) != n:
            raise UnsupportedError("a SentencePiece tokenizer is written to GGUF only with its piece scores (a "
                                   "tokenizer loaded from a GGUF file keeps them); this one came from "
                                   "tokenizer.json")
        if _normalizes(spec.get("normalizer")):
            raise UnsupportedError("this SentencePiece tokenizer normalizes text (NFKC or whitespace folding), "
                                   "which llama.cpp's tokenizer does not: a GGUF file would tokenize differently")
        meta["tokenizer.ggml.model"] = "llama"
        meta["tokenizer.ggml.scores"] = list(scores) + [-1000.0] * (vocab_size - n)
        for i, t in enumerate(tokens[:n]):
            if types[i] == 1 and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types[i] = 6  # byte tokens
        if model.get("unk_token") in vocab:
            types[vocab[model["unk_token"]]] = 2
        meta["tokenizer.ggml.add_space_prefix"] = bool(getattr(tok, "gguf_add_space_prefix", True))
    else:
        meta["tokenizer.ggml.model"] = "gpt2"
        meta["tokenizer.ggml.pre"] = _pre_name(spec.get("pre_tokenizer"))
        merges = model.get("merges", [])
        meta["tokenizer.ggml.merges"] = [m if isinstance(m, str) else " ".join(m) for m in merges]
    meta["tokenizer.ggml.tokens"] = tokens
    meta["tokenizer.ggml.token_type"] = types
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "padding_token_id": tok.token_id(tok.pad_token)}
    stops = [i for i in cfg.eos_token_ids if i != tok.eos_id]
    if ids["eos_token_id"] is None and cfg.eos_token_ids:
        ids["eos_token_id"], stops = cfg.eos_token_ids[0], cfg.eos_token_ids[1:]
    for key, i in zip(("eot_token_id", "eom_token_id"), stops):  # end of turn / of message (Llama-3.1)
        ids[key] = i
    if ids["bos_token_id"] is None and cfg.bos_token_id is not None:
        ids["bos_token_id"] = cfg.bos_token_id
    for k, v in ids.items():
        if v is not None:
            meta[f"tokenizer.ggml.{k}"] = int(v)
    meta["tokenizer.ggml.add_bos_token"] = bool(tok.add_bos)
    meta["tokenizer.ggml.add_eos_token"] = False
    if tok.chat_template:
        meta["tokenizer.chat_template"] = tok.chat_template
    return meta


def model_metadata(cfg: LlamaConfig, arch: str, outtype: str, name: str) -> dict[str, Any]:
    hd = cfg.dim_per_head
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
    if arch == "granite":  # llama.cpp's names for the multipliers
        meta[f"{arch}.embedding_scale"] = float(cfg.embedding_multiplier)
        meta[f"{arch}.residual_scale"] = float(cfg.residual_multiplier)
        meta[f"{arch}.logit_scale"] = float(cfg.logits_scaling)
        meta[f"{arch}.attention.scale"] = float(cfg.attention_multiplier if cfg.attention_multiplier is not None
                                                else cfg.dim_per_head ** -0.5)
    if arch == "phi3":  # as llama.cpp's converter: the rotary part of the head, the window, LongRoPE's context
        from efficientml.llm.model import rope_inv_freq

        meta[f"{arch}.rope.dimension_count"] = cfg.rotary_dim
        if cfg.sliding_window is not None:
            meta[f"{arch}.attention.sliding_window"] = int(cfg.sliding_window)
        if cfg.rope_type == "longrope":
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


def _tensor_bytes(w: torch.Tensor, ggml_type: int) -> np.ndarray:
    if ggml_type == 0:
        return w.detach().to(torch.float32).contiguous().numpy().view(np.uint8).reshape(-1)
    if ggml_type == 1:
        return w.detach().to(torch.float16).contiguous().numpy().view(np.uint8).reshape(-1)
    if ggml_type == 30:
        return w.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8).reshape(-1)
    return {8: quantize_q8_0, 2: quantize_q4_0, 3: quantize_q4_1}[ggml_type](w)


def _nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
    n = int(np.prod(shape))
    return n * 4 if ggml_type == 0 else n * 2 if ggml_type in (1, 30) else n // 32 * _BLOCK_BYTES[ggml_type]


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


def _qlinear_bytes(mod: nn.Module, kind: int, heads: int | None) -> np.ndarray:
    """A QuantLinear's codes and fp16 scales as Q4_0 / Q8_0 blocks (rows permuted for llama Q/K)."""
    codes, scale = mod.codes(), mod.weight_scale.to(torch.float16)  # (out, in) uint8, (out, G)
    if heads is not None:
        codes, scale = permute_rope_rows(codes, heads), permute_rope_rows(scale, heads)
    u = codes.to("cpu").numpy().reshape(-1, 32)
    d = scale.to("cpu").numpy().reshape(-1, 1).view(np.uint8).reshape(-1, 2)
    if kind == 2:
        return np.concatenate([d, _nibbles(u)], 1).reshape(-1)
    q = (u.astype(np.int16) - 128).astype(np.int8).view(np.uint8)  # codes 0…255 around 128 → int8
    return np.concatenate([d, q], 1).reshape(-1)


def _plan(model: nn.Module, arch: str, outtype: str) -> list[tuple[str, Any, tuple[int, ...], int]]:
    """(gguf name, state-dict key / a computed tensor / a QuantLinear, PyTorch shape, ggml type) for
    every tensor."""
    from efficientml.llm.model import rope_inv_freq

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
    if arch == "phi3":  # llama.cpp's phi3: q/k/v as one attn_qkv, gate/up as one ffn_up (gate rows first)
        if quantized:
            raise UnsupportedError(f"{next(iter(quantized))}: quantized linears are not fused into a phi3 GGUF; "
                                   "dequantize first")
        from efficientml.llm.io.fused import fuse_split

        state = fuse_split(cfg, state)
    for key, t in state.items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        prefix, leaf = key.rsplit(".", 1)
        if prefix in quantized:
            mod, kind = quantized[prefix]
            if leaf == "weight_packed":
                plan.append((gguf_name(f"{prefix}.weight"), mod, (mod.out_features, mod.in_features), kind))
            elif leaf == "bias":
                plan.append((gguf_name(key), key, tuple(t.shape), 0))
            continue
        shape = tuple(t.shape)
        kind = OUTTYPES[outtype]
        if t.dim() == 1:
            kind = 0
        elif kind in _BLOCK_BYTES and shape[-1] % 32:
            kind = 1  # as llama.cpp does: rows that do not fill whole blocks fall back to F16
        elif kind in (2, 3) and key in ("model.embed_tokens.weight", "lm_head.weight"):
            kind = 8  # embeddings and output above 4 bits, as llama.cpp's quantizer keeps them
        plan.append((gguf_name(key, arch), key if arch != "phi3" else t, shape, kind))  # phi3: fused tensors
    if cfg.rope_type == "longrope":  # phi3: LongRoPE's factors as tensors
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
    arch = _arch(cfg)
    meta = model_metadata(cfg, arch, outtype, name or path.stem)
    meta.update(tokenizer_metadata(tokenizer, cfg.vocab_size, cfg))
    meta.update(sampling_metadata(sampling or {}))
    plan = _plan(model, arch, outtype)
    state = model.state_dict()

    infos, offset = [], 0
    for gname, _, shape, kind in plan:
        dims = tuple(reversed(shape))  # GGUF lists the fastest-varying dimension first
        infos.append(_pack_string(gname) + struct.pack("<I", len(dims))
                     + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", kind, offset))
        offset += -(-_nbytes(shape, kind) // _ALIGN) * _ALIGN
    header = b"GGUF" + struct.pack("<IQQ", 3, len(plan), len(meta))
    header += b"".join(_pack_string(k) + _pack_value(v) for k, v in meta.items()) + b"".join(infos)

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header)
        _pad(f)
        for gname, src, shape, kind in plan:
            heads = None
            if arch in ("llama", "granite") and (".attn_q." in gname or ".attn_k." in gname):
                heads = cfg.num_attention_heads if ".attn_q." in gname else cfg.num_key_value_heads
            if isinstance(src, nn.Module):  # a QuantLinear: its own codes and scales, exactly
                f.write(_qlinear_bytes(src, kind, heads).tobytes())
                _pad(f)
                continue
            w = src if isinstance(src, torch.Tensor) else state[src]
            w = w.detach().to("cpu", torch.float32)
            if heads is not None:
                w = permute_rope_rows(w, heads)
            f.write(_tensor_bytes(w, kind).tobytes())
            _pad(f)
    return path


def _pad(f: BinaryIO) -> None:
    f.write(b"\0" * (-f.tell() % _ALIGN))
