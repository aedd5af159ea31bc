"""GGUF files: metadata, tensors dequantized by our own vectorized numpy code, names mapped to the
Hugging Face Llama layout, and llama.cpp's Q/K row permutation undone.

The container (header, key/values, tensor table) is parsed by :class:`GGUFFile`; the block formats
(Q4_0 … Q8_0, the k-quants Q2_K … Q6_K, IQ4_NL/IQ4_XS) are decoded by :mod:`efficientml.llm.io.ggml_quants`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from efficientml.core.errors import CheckpointError, ConfigError, EfficientMLError, UnsupportedError
from efficientml.llm import arch as families
from efficientml.llm.config import LlamaConfig
from efficientml.llm.io.ggml_quants import BLOCK_FORMATS, BLOCK_SIZES, SUPPORTED, UNDECODED, dequantize_blocks


@dataclass
class TensorInfo:
    name: str
    kind: str  # "F32", "Q4_1", …
    shape: tuple[int, ...]  # PyTorch order (rows, cols)
    data: np.ndarray  # uint8 bytes, memory-mapped

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


def tensor_to_torch(t: TensorInfo) -> torch.Tensor:
    """One tensor → float32 in PyTorch's (rows, cols) order."""
    kind, shape, raw = t.kind, t.shape, t.data
    if kind == "F32":
        return torch.from_numpy(raw.view(np.float32).reshape(shape).copy())
    if kind == "F16":
        return torch.from_numpy(raw.view(np.float16).reshape(shape).astype(np.float32))
    if kind == "BF16":
        u = raw.view(np.uint16).astype(np.uint32) << 16  # bf16 is the top half of an fp32
        return torch.from_numpy(u.view(np.float32).reshape(shape))
    if kind == "F64":
        return torch.from_numpy(raw.view(np.float64).reshape(shape).astype(np.float32))
    if kind in BLOCK_FORMATS:
        n = BLOCK_FORMATS[kind][1]
        if shape[-1] % n:
            raise CheckpointError(f"tensor {t.name!r}: row length {shape[-1]} is not a multiple of {kind}'s "
                                  f"block of {n}")
        return torch.from_numpy(dequantize_blocks(raw, kind, t.numel).reshape(shape))
    raise UnsupportedError(f"GGUF tensor {t.name!r} has type {kind}, which is not decoded; decoded: {SUPPORTED}")


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter reorders each head's Q/K rows from rotate-half (x0…x_{h/2-1} | x_{h/2}…)
    to interleaved pairs (x0, x_{h/2}, x1, …); put them back."""
    rows = w.shape[0]
    hd = rows // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, hd // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half Q/K rows → llama.cpp's interleaved pairs, as its converter writes them; the inverse
    of :func:`unpermute_rope_rows`."""
    rows, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *rest).transpose(1, 2).reshape(rows, *rest)


def llama3_scaling(factors: torch.Tensor, cfg: LlamaConfig, where: str) -> dict[str, Any] | None:
    """llama.cpp stores Llama-3.1-style RoPE scaling as one divisor per frequency (``rope_freqs.weight``)
    rather than as parameters; find the llama3 parameters (factor, low/high frequency factors, original
    context) that give exactly these divisors. None when every divisor is 1; an error when none fit,
    rather than a model whose positions are silently wrong."""
    from efficientml.llm.rope import rope_inv_freq

    f = factors.double().flatten()
    if f.numel() != cfg.dim_per_head // 2:
        raise CheckpointError(f"{where}: rope_freqs.weight has {f.numel()} values, expected head_dim/2 = "
                              f"{cfg.dim_per_head // 2}")
    if bool((f == 1).all()):
        return None
    plain = rope_inv_freq(replace(cfg, rope_scaling=None))[0].double()
    factor = float(f.max())
    for old in (8192, 4096, 2048, 16384, 32768, 65536, 131072):
        for lo, hi in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0), (2.0, 8.0)):
            sc = {"rope_type": "llama3", "factor": factor, "low_freq_factor": lo, "high_freq_factor": hi,
                  "original_max_position_embeddings": old}
            inv = rope_inv_freq(replace(cfg, rope_scaling=sc))[0].double()
            if torch.allclose(plain / inv, f, rtol=1e-4, atol=0):
                return sc
    raise UnsupportedError(f"{where}: rope_freqs.weight holds per-frequency RoPE divisors (up to {factor:g}) "
                           "that no llama3 scaling reproduces; such RoPE scaling is not supported")


_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def layer_names(fam: families.Family) -> dict[str, str]:
    """GGUF block tensor names → ours for a family: fused projections (Phi-3's attn_qkv / ffn_up) keep
    their Hugging Face (fused) names; load_gguf splits them like load_hf."""
    return {**_LAYER_NAMES, **{f.gguf: f.name for f in fam.fused_in_gguf()}}


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """``blk.3.attn_q.weight`` → ``model.layers.3.self_attn.q_proj.weight`` in a file of GGUF
    architecture ``arch``; None for unknown names."""
    parts = gguf_name.split(".")
    names = layer_names(families.by_gguf(arch)[0])
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    return None


def family_value(field: str, v: Any) -> Any:
    """A family-specific metadata value as the config field holds it: absent → the neutral value; a
    multiplier stored as 0 means unset (llama.cpp's granite: no attention scale → 1/sqrt(head dim))."""
    neutral = families.FAMILY_FIELDS.get(field)
    if v is None:
        return neutral
    if field == "sliding_window":
        return v
    return None if neutral is None and float(v) == 0.0 else float(v)


# GGUF value types → struct format (8: string, 9: array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
            12: "<d"}
_TENSOR_TYPES = {0: "F32", 1: "F16", 28: "F64", 30: "BF16", **{v[0]: k for k, v in BLOCK_FORMATS.items()},
                 **{i: v[0] for i, v in UNDECODED.items()}}
_ELEM_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


class _Cursor:
    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise CheckpointError(f"{str(self.path)!r} is truncated (header ends early)")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise CheckpointError(f"{str(self.path)!r} is truncated (header ends early)")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            itype, n = self.take("<I"), self.take("<Q")
            if itype in _SCALARS:  # numeric array: one vectorized read
                dt = np.dtype(_SCALARS[itype].replace("?", "b1"))
                end = self.pos + n * dt.itemsize
                if end > len(self.buf):
                    raise CheckpointError(f"{str(self.path)!r} is truncated (header ends early)")
                arr = np.frombuffer(self.buf[self.pos:end], dtype=dt)
                self.pos = end
                return arr.tolist()
            return [self.value(itype) for _ in range(n)]
        raise CheckpointError(f"{str(self.path)!r}: unknown GGUF value type {vtype}")


class GGUFFile:
    """An opened GGUF file (memory-mapped): ``.meta`` key/values, ``.config``, ``.tensors()``.

    The container is parsed here (header, key/values, tensor table; little-endian GGUF v2/v3); tensor
    bytes stay memory-mapped until dequantized one tensor at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"GGUF file {str(self.path)!r} does not exist")
        size = self.path.stat().st_size
        if size < 24:
            raise CheckpointError(f"{str(self.path)!r} is too small to be a GGUF file ({size} bytes)")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        cur = _Cursor(memoryview(self._map), self.path)
        if bytes(self._map[:4]) != b"GGUF":
            raise CheckpointError(f"{str(self.path)!r} is not a GGUF file (bad magic bytes)")
        cur.pos = 4
        version = cur.take("<I")
        if version not in (2, 3):
            raise UnsupportedError(f"{str(self.path)!r} is GGUF version {version}; versions 2 and 3 are read")
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise CheckpointError(f"{str(self.path)!r} has an implausible header (corrupt file)")
        self.meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.meta[key] = cur.value(cur.take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            ndim = cur.take("<I")
            if ndim > 8:
                raise CheckpointError(f"{str(self.path)!r}: tensor {name!r} has {ndim} dimensions (corrupt file)")
            dims = [cur.take("<Q") for _ in range(ndim)]
            ttype, offset = cur.take("<I"), cur.take("<Q")
            infos.append((name, dims, ttype, offset))
        align = self.meta.get("general.alignment", 32)
        if isinstance(align, bool) or not isinstance(align, (int, np.integer)) or align <= 0:
            raise CheckpointError(f"{str(self.path)!r}: general.alignment is {align!r}; expected a positive "
                                  "integer (32 by default)")
        align = int(align)
        data_start = (cur.pos + align - 1) // align * align
        self.infos: list[TensorInfo] = []
        for name, dims, ttype, offset in infos:
            kind = _TENSOR_TYPES.get(ttype, f"type{ttype}")
            shape = tuple(int(x) for x in reversed(dims))  # GGUF lists the fastest dimension first
            n = int(np.prod(shape))
            if kind in _ELEM_BYTES:
                nbytes = n * _ELEM_BYTES[kind]
            elif kind in BLOCK_SIZES:
                per, size_b = BLOCK_SIZES[kind]
                nbytes = -(-n // per) * size_b
            else:
                nbytes = 0  # unknown type: its size is unknown; loading the tensor says so
            start = data_start + offset
            if start + nbytes > size:
                raise CheckpointError(f"{str(self.path)!r} is truncated: tensor {name!r} needs bytes "
                                      f"{start}…{start + nbytes}, the file has {size}")
            self.infos.append(TensorInfo(name, kind, shape, self._map[start:start + nbytes]))

    def field(self, key: str) -> Any:
        return self.meta.get(key)

    @property
    def arch(self) -> str:
        return str(self.meta.get("general.architecture", ""))

    @cached_property
    def family(self) -> families.Family:
        return families.by_gguf(self.arch, self.path.name)[0]

    @cached_property
    def config(self) -> LlamaConfig:
        """The model configuration from the metadata (read once per opened file); a missing, zero or
        wrongly typed value is one CheckpointError naming the file."""
        try:
            return self._config()
        except (ConfigError, TypeError, ValueError, ZeroDivisionError) as e:
            if isinstance(e, EfficientMLError) and not isinstance(e, ConfigError):
                raise
            raise CheckpointError(f"{str(self.path)!r} has wrong model metadata: {e}") from None

    def _config(self) -> LlamaConfig:
        arch = self.arch
        fam, keys = families.by_gguf(arch, self.path.name)
        m = self.meta

        def get(key: str, default: Any = None) -> Any:
            return m.get(f"{arch}.{key}", default)

        n_heads = int(get("attention.head_count"))
        if n_heads <= 0:
            raise ConfigError(f"{arch}.attention.head_count is {n_heads}; expected a positive integer")
        d = int(get("embedding_length"))
        names = {t.name for t in self.infos}
        vocab = get("vocab_size")
        if vocab is None:
            vocab = len(self.meta.get("tokenizer.ggml.tokens", []))
        scaling, kind = self._rope_scaling(fam, get)
        head_dim = int(get("attention.key_length", get("rope.dimension_count", d // n_heads)))
        rotary = 1.0
        if fam.gguf.rope_dim_is_rotary:  # the rotary part of the head (Phi-4-mini: 3/4 of it)
            head_dim = int(get("attention.key_length", d // n_heads))
            rotary = int(get("rope.dimension_count", head_dim)) / head_dim
        if fam.gguf.longrope:
            scaling = self._longrope(get, head_dim * rotary) or scaling
        cfg = LlamaConfig(
            vocab_size=int(vocab), hidden_size=d, intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=int(get("block_count")), num_attention_heads=n_heads,
            num_key_value_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=head_dim, partial_rotary_factor=rotary,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            max_position_embeddings=int(get("context_length", 2048)),
            rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=scaling,
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            model_type=fam.model_type, **fam.fixed,
            **{field: family_value(field, get(key)) for field, key in keys.items()},
            bos_token_id=m.get("tokenizer.ggml.bos_token_id"), eos_token_id=self._stop_ids(),
            pad_token_id=m.get("tokenizer.ggml.padding_token_id"),
        )
        freqs = next((t for t in self.infos if t.name == "rope_freqs.weight"), None)
        if freqs is not None:
            llama3 = llama3_scaling(tensor_to_torch(freqs), cfg, self.path.name)
            if llama3 is not None and scaling is not None:
                raise UnsupportedError(f"{self.path.name}: both rope.scaling.type {kind!r} and rope_freqs.weight")
            cfg = replace(cfg, rope_scaling=llama3 or scaling)
        return cfg

    def _rope_scaling(self, fam: families.Family, get) -> tuple[dict[str, Any] | None, Any]:
        """Linear RoPE scaling from the metadata (LongRoPE's comes from tensors); the scaling type named."""
        kind = get("rope.scaling.type")
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}, kind
        if kind not in (None, "none") and not (fam.gguf.longrope and kind in ("longrope", "su")):
            raise UnsupportedError(f"{self.path.name}: RoPE scaling {kind!r} is not supported; linear, and "
                                   "llama3 (a rope_freqs.weight tensor) are")
        return None, kind

    def _longrope(self, get, rotary_dim: float) -> dict[str, Any] | None:
        """Phi-3's LongRoPE as llama.cpp's converter stores it: the factors as tensors, the pretrained
        context and the attention factor as metadata."""
        names = {"long_factor": "rope_factors_long.weight", "short_factor": "rope_factors_short.weight"}
        found = {t.name: t for t in self.infos if t.name in names.values()}
        if not found:
            return None
        if len(found) != 2:
            raise CheckpointError(f"{self.path.name}: LongRoPE needs both rope_factors_long and "
                                  "rope_factors_short")
        sc: dict[str, Any] = {"rope_type": "longrope"}
        for key, name in names.items():
            f = tensor_to_torch(found[name]).double().flatten()
            if f.numel() != int(rotary_dim) // 2:
                raise CheckpointError(f"{self.path.name}: {name} has {f.numel()} values, expected "
                                      f"{int(rotary_dim) // 2}")
            sc[key] = f.tolist()
        orig = get("rope.scaling.original_context_length")
        if orig is not None:
            sc["original_max_position_embeddings"] = int(orig)
        if get("rope.scaling.attn_factor") is not None:
            sc["attention_factor"] = float(get("rope.scaling.attn_factor"))
        return sc

    def _stop_ids(self) -> int | list[int] | None:
        """EOS, plus the end-of-turn / end-of-message tokens chat models end an answer with."""
        keys = ("eos_token_id", "eot_token_id", "eom_token_id")
        ids = list(dict.fromkeys(int(v) for k in keys if (v := self.meta.get(f"tokenizer.ggml.{k}")) is not None))
        return None if not ids else ids[0] if len(ids) == 1 else ids

    def tensors(self, cfg: LlamaConfig | None = None, skip: set[str] = frozenset()):
        """Yield ``(hf_name, float32 tensor)`` one at a time (bounded memory), but not those named in ``skip``."""
        cfg = cfg or self.config
        permute = self.family.gguf.permute_qk  # qwen2's and phi3's keep rotate-half order
        for t in self.infos:
            name = hf_name(t.name, self.arch)
            if name is None:
                if t.name.startswith(("rope_freqs", "rope_factors_")) or t.name.endswith("rope_freqs.weight"):
                    continue
                raise UnsupportedError(f"{self.path.name}: GGUF tensor {t.name!r} has no place in a Llama model")
            if name in skip:
                continue
            try:
                w = tensor_to_torch(t)
            except (ValueError, IndexError) as e:
                raise CheckpointError(f"{self.path.name}: tensor {t.name!r} is truncated or corrupt ({e})") from None
            if permute and ".self_attn.q_proj." in name:
                w = unpermute_rope_rows(w, cfg.num_attention_heads)
            elif permute and ".self_attn.k_proj." in name:
                w = unpermute_rope_rows(w, cfg.num_key_value_heads)
            yield name, w
