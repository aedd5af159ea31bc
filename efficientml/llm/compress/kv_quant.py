"""Quantized KV cache (int8 / int4) that plugs into the model's :class:`KVCache` interface.

Keys and values are stored as integer codes with one scale (and zero, int4) per token, per KV head and
per group of ``group_size`` head dimensions (default: the whole head). ``update`` quantizes the new
entries and returns the dequantized prefix, so attention itself is unchanged; memory holds the codes:
int8 ≈ 1/4 of fp32 (+ scales), int4 packs two codes per byte.

    cache = QuantizedKVCache.for_model(model, batch_size=1, max_length=512, bits=8)
    generate(model, prompt, cfg, cache=cache)        # or model(ids, cache=cache)

    efficientml.apply(model, KVCacheQuantConfig(bits=4), inplace=True)
    model.new_cache(1, 512)                          # now a QuantizedKVCache

On CPU at batch 1, after :func:`~efficientml.llm.kernels.prepare_cpu_decode`, ``generate`` decodes on this
cache in C (:mod:`efficientml.llm.kernels.native_step`): each new key/value is quantized there to the same
codes, scales and zeros as :meth:`QuantizedKVCache._quantize`, and attention reads the codes directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from efficientml.core.config import Config, check_choice
from efficientml.core.errors import ConfigError, UnsupportedError
from efficientml.core.transform import LayerFilter, TransformResult, register_transform
from efficientml.llm.kv_cache import KVCache
from efficientml.quant.grid import GridSpec, quantize as grid_quantize

_INT8_KV = GridSpec(8, symmetric=True, granularity="group", group_size=1, narrow=True, scale_dtype="float16")


class QuantizedKVCache(KVCache):
    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_length: int,
                 bits: int = 8, group_size: int | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        if bits not in (4, 8):
            raise ConfigError(f"KV-cache bits must be 8 or 4, got {bits!r}")
        if max_length <= 0 or batch_size <= 0:
            raise ConfigError(f"cache needs positive batch_size and max_length, got {batch_size}, {max_length}")
        g = group_size or head_dim
        if head_dim % g or (bits == 4 and g % 2):
            raise ConfigError(f"KV group_size {g} must divide head_dim {head_dim} (and be even for int4)")
        self.bits, self.g, self.dtype, self.hd = bits, g, dtype, head_dim
        self.max_length, self.batch_size, self.length = max_length, batch_size, 0
        shape = (num_layers, batch_size, num_kv_heads, max_length)
        width = head_dim if bits == 8 else head_dim // 2
        code_dtype = torch.int8 if bits == 8 else torch.uint8
        self.codes = [torch.zeros(*shape, width, dtype=code_dtype, device=device) for _ in range(2)]  # k, v
        self.scales = [torch.zeros(*shape, head_dim // g, dtype=torch.float16, device=device) for _ in range(2)]
        self.zeros = ([torch.zeros(*shape, head_dim // g, dtype=torch.float16, device=device) for _ in range(2)]
                      if bits == 4 else None)

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_length: int, bits: int = 8,
                  group_size: int | None = None) -> "QuantizedKVCache":
        cfg = model.config
        p = next(model.parameters())
        dtype = p.dtype if p.is_floating_point() else torch.float32
        return cls(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, cfg.dim_per_head, max_length,
                   bits, group_size, dtype, p.device)

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        B, H, T, hd = x.shape
        if self.bits == 8:  # the shared grid: symmetric, narrow [-127, 127], fp16 scales per group
            qt = grid_quantize(x.float().reshape(-1, hd), _INT8_KV.replace(group_size=self.g))
            return qt.q.reshape(B, H, T, hd), qt.scale.half().reshape(B, H, T, -1), None
        # int4: asymmetric with a float zero (the group minimum, fp16), not an integer zero point
        xg = x.float().reshape(B, H, T, hd // self.g, self.g)  # groups along the head dimension
        lo, hi = xg.amin(-1), xg.amax(-1)
        s = ((hi - lo) / 15.0).clamp(min=1e-8).half()
        z = lo.half()  # fp16 zero = group minimum
        q = torch.round((xg - z.float()[..., None]) / s.float()[..., None]).clamp(0, 15).to(torch.uint8)
        q = q.reshape(B, H, T, hd // 2, 2)
        return (q[..., 0] | (q[..., 1] << 4)), s, z  # two codes per byte, low nibble first

    def _dequantize(self, kind: int, layer: int, end: int) -> torch.Tensor:
        c = self.codes[kind][layer][:, :, :end]
        s = self.scales[kind][layer][:, :, :end].float()[..., None]
        B, H, T = c.shape[:3]
        if self.bits == 8:
            x = c.float().reshape(B, H, T, -1, self.g) * s
        else:
            u = torch.stack((c & 15, c >> 4), dim=-1).reshape(B, H, T, -1, self.g).float()
            x = u * s + self.zeros[kind][layer][:, :, :end].float()[..., None]
        return x.reshape(B, H, T, self.hd).to(self.dtype)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
               input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        for kind, x in enumerate((k, v)):
            q, s, z = self._quantize(x)
            self.codes[kind][layer_idx][:, :, start:end] = q
            self.scales[kind][layer_idx][:, :, start:end] = s
            if z is not None:
                self.zeros[kind][layer_idx][:, :, start:end] = z
        return self._dequantize(0, layer_idx, end), self._dequantize(1, layer_idx, end)  # (B, nkv, end, hd)

    def nbytes(self) -> int:
        ts = self.codes + self.scales + (self.zeros or [])
        return sum(t.numel() * t.element_size() for t in ts)


def kv_quant_score_fn(model: torch.nn.Module, bits: int, group_size: int | None = None):
    """A ``score_fn`` for :func:`efficientml.llm.eval.perplexity` that runs each window through a
    quantized KV cache, so every attention reads dequantized keys/values (the same protocol, only the
    cache differs)."""
    from efficientml.llm.eval import nll_from_hidden

    @torch.inference_mode()
    def score(input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        dev = next(model.parameters()).device
        input_ids, labels = input_ids.to(dev), labels.to(dev)
        B, T = input_ids.shape
        cache = QuantizedKVCache.for_model(model, B, T, bits, group_size)
        return nll_from_hidden(model, model.model(input_ids, cache), labels)  # h: (B, T, d)

    return score


@dataclass(frozen=True)
class KVCacheQuantConfig(Config):
    """Store the model's KV cache as int8 or int4 codes: after ``apply(model, KVCacheQuantConfig(...))``
    ``model.new_cache(...)`` returns a :class:`QuantizedKVCache`. ``group_size``: head dimensions per
    scale (None: the whole head). Path "real": the cache holds the integer codes."""

    kind = "kv_cache_quant"
    bits: int = 8
    group_size: int | None = None

    def validate(self) -> None:
        check_choice("KV-cache bits", self.bits, (4, 8))
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ConfigError(f"KV group_size must be a positive integer or None (whole head), got {self.group_size!r}")


@dataclass(frozen=True)
class QuantizedCacheFactory:
    """What ``model.new_cache`` calls once the model's cache is quantized (a plain, copyable object)."""

    bits: int
    group_size: int | None

    def __call__(self, model: torch.nn.Module, batch_size: int, max_length: int,
                 static_shapes: bool = False) -> QuantizedKVCache:
        if static_shapes:
            raise UnsupportedError("a quantized KV cache has no static-shape mode; call new_cache(static_shapes=False)")
        return QuantizedKVCache.for_model(model, batch_size, max_length, self.bits, self.group_size)


@register_transform(KVCacheQuantConfig)
def _quantize_kv_cache(model: torch.nn.Module, config: KVCacheQuantConfig, *, calib: object,
                       filter: LayerFilter) -> TransformResult:
    if filter != LayerFilter():
        raise UnsupportedError("KVCacheQuantConfig quantizes the cache of every attention layer; it takes no layer filter")
    if not hasattr(model, "new_cache"):
        raise UnsupportedError(f"{type(model).__name__} has no new_cache(); expected an efficientml LlamaForCausalLM")
    factory = QuantizedCacheFactory(config.bits, config.group_size)
    factory(model, 1, 1)                               # a bad group size fails here, not at generation
    model.kv_cache_factory = factory
    layers = {f"model.layers.{i}.self_attn": {"kv_bits": config.bits, "group_size": config.group_size}
              for i in range(model.config.num_hidden_layers)}
    return TransformResult(model, config, "real", layers, {"bits": config.bits, "group_size": config.group_size})
