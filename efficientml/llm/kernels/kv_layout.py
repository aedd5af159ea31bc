"""The int8 / int4 quantized KV cache as the native decode step (:mod:`.native_step`) reads and writes
it: :class:`~efficientml.llm.compress.kv_quant.QuantizedKVCache`'s buffers, told by their attributes
(``codes``, ``scales``, ``zeros``, ``bits``, ``g``) because llm.kernels may not import llm.compress.

Per layer, kv head and position: int8 codes (hd) or int4 codes two per byte, low nibble first (hd/2);
fp16 scales (hd/g); int4 also fp16 zeros (hd/g), the group minimum. All (layers, 1, n_kv, max_len, ·).
"""

from __future__ import annotations

import torch
from torch import nn

KV_CODES = {8: 3, 4: 4}  # bits → the C side's cache kind (DT_Q8, DT_Q4)


def is_quantized_cache(cache) -> bool:
    """Whether ``cache`` is laid out as :class:`~efficientml.llm.compress.kv_quant.QuantizedKVCache` (told by
    its attributes: this layer may not import llm.compress)."""
    return all(hasattr(cache, a) for a in ("codes", "scales", "zeros", "bits", "g"))


def quantized_cache_why(model: nn.Module, cache) -> str | None:
    """None when the quantized cache's buffers are the layout the C side reads for this model, else why not."""
    cfg, bits, g = model.config, cache.bits, cache.g
    if bits not in KV_CODES:
        return f"the cache holds {bits}-bit codes (the native step reads int8 and int4 codes)"
    hd = cfg.dim_per_head
    if not isinstance(g, int) or g <= 0 or hd % g or (bits == 4 and g % 2):
        return f"the cache's group size {g!r} does not divide head_dim {hd} (evenly for int4)"
    rows = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cache.max_length)
    want = [((*rows, hd if bits == 8 else hd // 2), torch.int8 if bits == 8 else torch.uint8)] * 2 + \
        [((*rows, hd // g), torch.float16)] * (2 if bits == 8 else 4)
    bufs = [*cache.codes, *cache.scales, *(cache.zeros or [] if bits == 4 else [])]
    if len(bufs) != len(want) or any(not isinstance(t, torch.Tensor) for t in bufs):
        return "the quantized cache lacks its k/v codes, scales or zeros"
    for t, (shape, dtype) in zip(bufs, want):
        if t.device.type != "cpu" or tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous():
            return f"a quantized cache buffer is {t.dtype} {tuple(t.shape)} on {t.device.type} " \
                   f"(the native step reads contiguous CPU {dtype} {shape})"
    return None
