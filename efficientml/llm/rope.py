"""Rotary position embeddings (RoPE) in Hugging Face's rotate-half layout, with the scalings
transformers implements: linear (position interpolation), dynamic NTK, Llama 3, YaRN and LongRoPE.

    rope = Rotary(cfg)
    cos, sin = rope(positions)                  # (T, r) each, r = cfg.rotary_dim ≤ head dim
    q = apply_rope(q, cos, sin)                 # q: (B, nh, T, hd)

:func:`rope_inv_freq` gives the inverse frequencies and the attention factor a scaling implies (the
GGUF reader and writer use it to recognise and write llama.cpp's rope metadata).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from efficientml.llm.config import LlamaConfig


def rope_inv_freq(cfg: LlamaConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (hd/2,) after the configured scaling, and the attention scaling factor.
    ``seq_len``: the sequence length "dynamic" (NTK) and "longrope" scaling adapt to. Over the rotary
    dimensions only (all of the head unless ``partial_rotary_factor`` < 1)."""
    hd = cfg.rotary_dim
    base = float(cfg.rope_theta)
    sc = cfg.rope_scaling or {}
    kind = cfg.rope_type
    ctx = cfg.max_position_embeddings
    if kind == "dynamic" and seq_len is not None and seq_len > ctx:
        # dynamic NTK (transformers' "dynamic"): within the trained context nothing changes; beyond it the
        # base grows with the sequence so the lowest frequency still spans it
        factor = float(sc["factor"])
        base = base * (factor * seq_len / ctx - (factor - 1)) ** (hd / (hd - 2))
    inv = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float64, device="cpu") / hd)
    if kind == "linear":  # position interpolation: positions / factor
        inv = inv / float(sc["factor"])
    elif kind == "llama3":  # long wavelengths slowed by factor, short ones kept, smooth ramp between
        factor = float(sc["factor"])
        lo, hi = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
        old = float(sc.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        ramp = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)  # 0: long wavelength, 1: short
        inv = (1 - ramp) * inv / factor + ramp * inv
    elif kind == "yarn":
        return _yarn(cfg, inv, base)
    elif kind == "longrope":
        return _longrope(cfg, inv, seq_len)
    return inv.float(), 1.0


def _longrope(cfg: LlamaConfig, inv: torch.Tensor, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """LongRoPE (Ding et al. 2024; Phi-3): each frequency divided by a searched factor, the short list
    within the pretrained context, the long list once the sequence goes past it; cos/sin scaled by
    sqrt(1 + ln(s) / ln(original context)), s = context / original context, unless given."""
    sc, orig = cfg.rope_scaling or {}, cfg.rope_original_context
    long = seq_len is not None and seq_len > orig
    ext = torch.tensor(sc["long_factor" if long else "short_factor"], dtype=torch.float64, device="cpu")
    scale = sc.get("attention_factor")
    if scale is None:
        s = cfg.max_position_embeddings / orig if orig != cfg.max_position_embeddings \
            else float(sc.get("factor", 1))
        scale = math.sqrt(1 + math.log(s) / math.log(orig)) if s > 1 else 1.0
    return (inv / ext).float(), float(scale)


def _yarn(cfg: LlamaConfig, inv: torch.Tensor, base: float) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): frequencies that turn more than ``beta_fast`` times over the original
    context are kept, those turning fewer than ``beta_slow`` times are interpolated (÷ factor), a linear
    ramp over the dimensions between; cos/sin are scaled by the attention factor (0.1·ln(factor) + 1
    unless given; DeepSeek's mscale / mscale_all_dim ratio when both are)."""
    sc, hd = cfg.rope_scaling or {}, cfg.dim_per_head
    factor = float(sc["factor"])
    old = float(sc.get("original_max_position_embeddings") or cfg.max_position_embeddings)

    def dim_turning(turns: float) -> float:  # the (fractional) dimension whose frequency turns `turns` times
        return hd * math.log(old / (turns * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = dim_turning(float(sc.get("beta_fast") or 32)), dim_turning(float(sc.get("beta_slow") or 1))
    if sc.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, hd - 1)
    if lo == hi:
        hi += 0.001
    i = torch.arange(hd // 2, dtype=torch.float64, device="cpu")
    ramp = ((i - lo) / (hi - lo)).clamp(0, 1)  # 0: kept … 1: interpolated
    inv = inv * (1 - ramp) + inv / factor * ramp

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = sc.get("attention_factor")
    if attn is None:
        m, m_all = sc.get("mscale"), sc.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return inv.float(), float(attn)


class Rotary(nn.Module):
    """cos/sin tables by absolute position, grown on demand; indexing by a position tensor keeps the
    decode step free of host syncs (graph-capturable once the table is large enough).

    Dynamic NTK and LongRoPE scaling depend on the sequence length: within the trained context (the
    pretrained one for LongRoPE: ``initial``) the plain table serves; a sequence longer than it
    (``seq_len``) gets cos/sin computed for its positions with the frequencies that length implies — as
    transformers does, whose cached keys also keep the rotation they were stored with."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.dynamic = cfg.rope_type in ("dynamic", "longrope")
        self.inv_freq, self.scale = rope_inv_freq(cfg)  # plain CPU tensor: not a weight
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        self.initial = cfg.rope_original_context if cfg.rope_type == "longrope" else cfg.max_position_embeddings

    def tables(self, n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._cos
        if c is None or c.shape[0] < n or c.device != device or c.dtype != dtype:
            n = max(n, self.initial, 0 if c is None else c.shape[0])
            t = torch.arange(n, dtype=torch.float64, device="cpu")
            f = torch.outer(t, self.inv_freq.double())  # (n, hd/2)
            emb = torch.cat([f, f], dim=-1)  # (n, hd) rotate-half layout
            self._cos = (emb.cos() * self.scale).to(device=device, dtype=dtype)
            self._sin = (emb.sin() * self.scale).to(device=device, dtype=dtype)
        return self._cos, self._sin  # type: ignore[return-value]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32,
                max_pos: int | None = None, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (…, T, hd) at ``positions``; ``seq_len`` (default: the last position + 1) matters
        only to dynamic scaling."""
        if self.dynamic:
            seq_len = seq_len if seq_len is not None else int(positions.max()) + 1
            if seq_len > self.initial:
                inv, scale = rope_inv_freq(self.cfg, seq_len)
                f = positions.double().cpu()[..., None] * inv.double()  # (…, T, hd/2)
                emb = torch.cat([f, f], dim=-1)
                return ((emb.cos() * scale).to(positions.device, dtype),
                        (emb.sin() * scale).to(positions.device, dtype))
        n = max_pos if max_pos is not None else int(positions.max()) + 1
        cos, sin = self.tables(n, positions.device, dtype)
        return cos[positions], sin[positions]  # (…, T, hd)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, nh, T, hd); cos/sin: (T, r) or (B, T, r), r ≤ hd: the first r dimensions turn (partial
    rotary, Phi-4-mini), the rest pass."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, r)
    r = cos.shape[-1]
    if r < x.shape[-1]:
        x, rest = x[..., :r], x[..., r:]
        return torch.cat([x * cos + _rotate_half(x) * sin, rest], dim=-1)
    return x * cos + _rotate_half(x) * sin
