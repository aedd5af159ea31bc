"""One decoder-only Transformer for the LLaMA family (Llama 1/2/3, Mistral, Qwen2, Qwen3, Phi-3, Granite,
SmolLM).

Module names follow Hugging Face's ``LlamaForCausalLM`` exactly, so weight names, scaling groups and
quantized-module swaps are plain data::

    model.embed_tokens                       nn.Embedding(vocab, d)
    model.layers[i].input_layernorm          RMSNorm(d)
    model.layers[i].self_attn.q_proj         nn.Linear(d, n_heads * hd)        (bias: Qwen2)
    model.layers[i].self_attn.k_proj         nn.Linear(d, n_kv_heads * hd)
    model.layers[i].self_attn.v_proj         nn.Linear(d, n_kv_heads * hd)
    model.layers[i].self_attn.o_proj         nn.Linear(n_heads * hd, d)
    model.layers[i].self_attn.q_norm / k_norm RMSNorm(hd) per head, before RoPE   (Qwen3 only)
    model.layers[i].post_attention_layernorm RMSNorm(d)
    model.layers[i].mlp.gate_proj / up_proj  nn.Linear(d, ffn)
    model.layers[i].mlp.down_proj            nn.Linear(ffn, d)
                                             (Phi-3's fused qkv_proj / gate_up_proj are split at load)
    model.norm                               RMSNorm(d)
    lm_head                                  nn.Linear(d, vocab), sharing embed_tokens.weight when tied

Every linear is a plain ``nn.Linear``, so it can be swapped for a quantized module with the same call.
Loaded models are *packed* (:func:`pack_projections`): q/k/v (and gate/up) weights become row views of
one buffer and run as one matmul (on CPU: for one-row inputs) — same names, same ``state_dict``, no
extra memory. Replacing any of those modules (or moving/casting the model) silently returns to one call
per module. For batch-1 decoding, :func:`use_cpu_gemv` / :func:`use_gpu_gemv` route one-row inputs of
the linears to efficientml's matrix-vector kernels (:func:`prepare_cpu_decode` picks the CPU path).

**A decoder block runs on its own** (calibration captures and transforms one block at a time)::

    rope = model.model.rope(positions)          # (cos, sin), each (T, hd); positions = torch.arange(T)
    y = model.model.layers[i](x, rope)           # x, y: (B, T, d); causal attention over the T tokens
    y = block(x, rope, attn_mask=mask, cache=None)

``attn_mask`` is None (plain causal), or a bool ``(T, S)`` / float ``(n_heads, T, S)`` tensor
broadcast over the batch, or ``(B, 1|n_heads, T, S)`` per row (left padding) (True / finite = may
attend); ``model.model.attention_mask(...)`` builds it for sliding windows and ALiBi, and
``model.model.with_padding(...)`` adds a row's padding. ``cache`` is a
:class:`~efficientml.llm.kv_cache.KVCache`; with a cache the block appends its keys/values and
attends to all cached ones.

Attention goes through ``F.scaled_dot_product_attention``; RoPE is rotate-half (HF layout; llama.cpp's
interleaved Q/K rows are un-permuted at load time).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from efficientml.core.errors import ShapeError
from efficientml.llm.kernels import cpu_gemv, triton_gemv
from efficientml.llm.config import LlamaConfig, alibi_slopes
from efficientml.llm.kv_cache import KVCache

_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # statistics in fp32
        return self.weight * h.to(dt)


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


class _Packed:
    """Runs several ``nn.Linear`` s that read the same input as one matmul (fewer, larger kernels: the
    decode step is bound by per-kernel overhead as much as by bandwidth). :func:`pack_projections`
    moves their weights into one buffer and makes each module's weight a view of its rows, so names,
    ``state_dict`` and memory are unchanged. The packed path is used only while every module is still
    a plain ``nn.Linear`` whose weight is that view — swap one for a quantized module, or assign it a
    new weight, and the modules run separately again.

    On CPU the packed matmul runs for one-row inputs (decoding), and for as many rows as the
    matrix-vector kernel takes once it is on (:func:`use_cpu_gemv`: a small batch of sequences);
    with more rows (prefill, perplexity windows) MKL runs the separate, narrower matmuls faster
    (measured on SmolLM2-135M's forward at 46 to 1024 tokens)."""

    def __init__(self) -> None:
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.sizes: list[int] = []
        self.ptrs: tuple[int, ...] = ()
        self.cpu_gemv = False  # one-row inputs on a matrix-vector kernel (use_cpu_gemv / use_gpu_gemv)
        self.gpu_gemv = False

    def pack(self, mods: tuple[nn.Linear, ...]) -> None:
        if any(type(m) is not nn.Linear for m in mods) or any(m.weight.is_meta for m in mods):
            return
        if len({m.weight.dtype for m in mods}) != 1 or len({m.bias is None for m in mods}) != 1:
            return
        with torch.no_grad():
            w = torch.cat([m.weight for m in mods])  # (sum out, in)
            b = torch.cat([m.bias for m in mods]) if mods[0].bias is not None else None
            self.sizes = [m.out_features for m in mods]
            o = 0
            for m, n in zip(mods, self.sizes):
                m.weight = nn.Parameter(w[o:o + n], requires_grad=m.weight.requires_grad)
                if b is not None:
                    m.bias = nn.Parameter(b[o:o + n], requires_grad=m.bias.requires_grad)
                o += n
        self.weight, self.bias = w, b
        self.ptrs = tuple(m.weight.data_ptr() for m in mods)

    def active(self, mods: tuple[nn.Module, ...]) -> bool:
        """Whether ``mods`` still run as one matmul (unpacks for good once a weight was replaced)."""
        if self.weight is None or any(type(m) is not nn.Linear for m in mods):
            return False
        if torch.compiler.is_compiling():  # traced once; data_ptr is not traceable
            return True
        if tuple(m.weight.data_ptr() for m in mods) != self.ptrs or mods[0].weight.dtype != self.weight.dtype:
            self.weight = self.bias = None  # a weight was replaced (moved, cast, reassigned)
            return False
        return True

    def __call__(self, x: torch.Tensor, mods: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...] | None:
        if not self.active(mods):
            return None
        if torch.is_grad_enabled() and any(m.weight.requires_grad for m in mods):
            return None  # training: let autograd see each module's own weight
        y = _gemv(self, x, self.weight, self.bias)
        if y is None:
            if x.device.type == "cpu" and x.numel() != x.shape[-1]:
                return None  # several rows on CPU: separate matmuls (see the class docstring)
            y = F.linear(x, self.weight, self.bias)
        return y.split(self.sizes, dim=-1)


def _gemv(owner: object, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor | None:
    """``F.linear(x, w, b)`` on the matrix-vector kernel ``owner`` was switched to (:func:`use_cpu_gemv`,
    :func:`use_gpu_gemv`) when it can take this call (few rows, see each kernel's ``eligible``), else None."""
    if getattr(owner, "cpu_gemv", False) and cpu_gemv.eligible(x, w, b):
        return cpu_gemv.gemv(x, w, b)
    if getattr(owner, "gpu_gemv", False) and triton_gemv.eligible(x, w, b):
        return triton_gemv.gemv(x, w, b)
    return None


def _linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)``; a plain ``nn.Linear`` switched to a matrix-vector kernel (and without hooks) runs a
    one-row input on it instead — the same product, faster."""
    if type(mod) is nn.Linear and not mod._forward_hooks and not mod._forward_pre_hooks:
        y = _gemv(mod, x, mod.weight, mod.bias)
        if y is not None:
            return y
    return mod(x)


def pack_projections(model: nn.Module) -> nn.Module:
    """Pack q/k/v and gate/up of every block (see :class:`_Packed`); idempotent, in place."""
    for mod in model.modules():
        if isinstance(mod, Attention):
            mod.packed.pack((mod.q_proj, mod.k_proj, mod.v_proj))
        elif isinstance(mod, MLP):
            mod.packed.pack((mod.gate_proj, mod.up_proj))
    return model


def decode_layout(model: nn.Module) -> nn.Module:
    """Store every ``nn.Linear`` weight (out, in) as the transpose of a contiguous (in, out) buffer, in
    place, for inference on CPU. A batch-1 decode step is a chain of matrix-vector products that stream
    the weights from memory; with this layout ``F.linear`` reaches the BLAS kernel that reads the
    weight row after row (more bandwidth than the default layout on x86 CPUs; benchmarks/llm_core.py
    measures it). Values, names, shapes and ``state_dict`` are unchanged (savers make
    tensors contiguous), packed q/k/v and gate/up stay packed, and tied embeddings stay tied.

    Call it after compression, before generation: code that ``view``-s a weight needs contiguous
    weights. Idempotent; training still works (autograd sees ordinary, if strided, parameters)."""

    def relaid(w: torch.Tensor) -> torch.Tensor:
        return w if w.dim() != 2 or w.stride() == (1, w.shape[0]) else w.t().contiguous().t()

    with torch.no_grad():
        done: dict[int, nn.Parameter] = {}  # shared (tied) weights are re-laid once
        for mod in model.modules():
            if isinstance(mod, (Attention, MLP)):
                mods = (mod.q_proj, mod.k_proj, mod.v_proj) if isinstance(mod, Attention) else (mod.gate_proj, mod.up_proj)
                if not mod.packed.active(mods):
                    continue  # no longer packed (a module was swapped)
                w = relaid(mod.packed.weight)  # (sum out, in) view of an (in, sum out) buffer
                o = 0
                for m, n in zip(mods, mod.packed.sizes):
                    m.weight = nn.Parameter(w[o:o + n], requires_grad=m.weight.requires_grad)
                    done[id(m.weight)] = m.weight
                    o += n
                mod.packed.weight = w
                mod.packed.ptrs = tuple(m.weight.data_ptr() for m in mods)
        for mod in model.modules():
            if type(mod) is nn.Linear and id(mod.weight) not in done:
                old = mod.weight
                new = nn.Parameter(relaid(old.detach()), requires_grad=old.requires_grad)
                mod.weight = new
                done[id(new)] = new
                for other in model.modules():  # keep ties (lm_head ↔ embed_tokens)
                    if isinstance(other, nn.Embedding) and other.weight is old:
                        other.weight = new
    return model


def use_cpu_gemv(model: nn.Module, enable: bool = True) -> bool:
    """Run every plain ``nn.Linear`` of ``model`` (and the packed q/k/v, gate/up) on the CPU
    matrix-vector kernel (:mod:`efficientml.llm.kernels.cpu_gemv`) whenever its input is 1 to
    ``cpu_gemv.MAX_ROWS`` fp32 rows — decoding at batch 1 or a small batch — and through
    ``F.linear`` otherwise. Builds the kernel on first use; returns False (and changes nothing)
    when it is off, ``cpu_gemv.status()`` says why. Weights keep nn.Linear's (out, in) layout; a
    weight that is not contiguous (see :func:`decode_layout`) or not fp32, and a module that was
    swapped or has hooks, runs as before. ``enable=False`` undoes it."""
    if enable and not cpu_gemv.available():
        return False
    _mark(model, "cpu_gemv", enable)
    return True


def use_gpu_gemv(model: nn.Module, enable: bool = True) -> bool:
    """Like :func:`use_cpu_gemv`, for CUDA: one-row inputs of plain ``nn.Linear`` s (and the packed
    q/k/v, gate/up) run on the Triton matrix-vector kernel (:mod:`efficientml.llm.kernels.triton_gemv`, block
    sizes tuned per shape on first use) instead of cuBLAS. False (nothing changed) without Triton or
    a GPU (or the CPU interpreter, ``TRITON_INTERPRET=1``)."""
    dev = next(model.parameters()).device
    if enable and not triton_gemv.available(dev):
        return False
    _mark(model, "gpu_gemv", enable)
    return True


def _mark(model: nn.Module, flag: str, enable: bool) -> None:
    """Set a kernel flag on every plain nn.Linear and every packed projection group."""
    for mod in model.modules():
        if type(mod) is nn.Linear:
            setattr(mod, flag, enable)
        elif isinstance(mod, (Attention, MLP)):
            setattr(mod.packed, flag, enable)


def prepare_cpu_decode(model: nn.Module) -> str:
    """Make batch-1 CPU decoding fast, in place, and say how: the matrix-vector kernel when it
    builds (:func:`use_cpu_gemv`), else :func:`decode_layout` for MKL's kernel."""
    if use_cpu_gemv(model):
        return "cpu_gemv kernel, (out, in) weights"
    decode_layout(model)
    return f"decode_layout (in, out) weights for MKL; the kernel is {cpu_gemv.status()}"


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_per_head
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, d, bias=cfg.o_bias)
        self.use_rope = cfg.position_embedding == "rope"
        self.scale = cfg.attention_multiplier  # None: 1/sqrt(hd), SDPA's default
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qk_norm else None  # Qwen3
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.packed = _Packed()  # one matmul for q, k, v while they are views of one buffer

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                attn_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.packed(x, (self.q_proj, self.k_proj, self.v_proj))
        if qkv is None:
            q, k, v = _linear(self.q_proj, x), _linear(self.k_proj, x), _linear(self.v_proj, x)
        else:
            q, k, v = qkv
        q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        if self.q_norm is not None:  # per head, over hd
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            cos, sin = rope  # type: ignore[misc]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            if input_pos is None:
                input_pos = torch.arange(cache.length, cache.length + T, device=x.device)
            k, v = cache.update(self.layer_idx, k, v, input_pos)  # (B, nkv, S, hd)
        g = self.n_heads // self.n_kv
        if T == 1 and attn_mask is None and g > 1:
            # one query per KV head group, no mask: fold the group into the query axis, no K/V repeat
            o = F.scaled_dot_product_attention(q.view(B, self.n_kv, g, self.hd), k, v,
                                               scale=self.scale)  # (B, nkv, g, hd)
            o = o.reshape(B, 1, self.n_heads * self.hd)
        else:
            causal = attn_mask is None and T > 1
            if causal and k.shape[2] != T:
                raise ShapeError("attention over cached keys with several new queries needs an explicit mask")
            if g > 1 and not _HAS_GQA:
                k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (B, nh, S, hd)
            kw = {"enable_gqa": True} if g > 1 and _HAS_GQA else {}
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=self.scale,
                                               **kw)
            o = o.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)  # (B, T, nh*hd)
        return _linear(self.o_proj, o)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=cfg.mlp_bias)
        self.act = {"silu": F.silu, "gelu": F.gelu,
                    "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh")}[cfg.hidden_act]
        self.packed = _Packed()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.packed(x, (self.gate_proj, self.up_proj))
        g, u = gu if gu is not None else (_linear(self.gate_proj, x), _linear(self.up_proj, x))
        return _linear(self.down_proj, self.act(g) * u)  # SwiGLU


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``h + mlp(norm(h))``. See the module docstring for
    the call signature used when running one block alone."""

    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.residual_multiplier = cfg.residual_multiplier  # Granite; 1 elsewhere

    def forward(self, hidden_states: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                attn_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(hidden_states), rope, attn_mask, cache, input_pos)
        if self.residual_multiplier != 1.0:
            a = a * self.residual_multiplier
        h = hidden_states + a
        m = self.mlp(self.post_attention_layernorm(h))
        return h + (m * self.residual_multiplier if self.residual_multiplier != 1.0 else m)


class LlamaModel(nn.Module):
    """Embedding → blocks → final norm; returns hidden states (B, T, d)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = Rotary(cfg)
        self._slopes = (torch.tensor(alibi_slopes(cfg.num_attention_heads), device="cpu")
                        if cfg.position_embedding == "alibi" else None)

    def attention_mask(self, q_pos: torch.Tensor, kv_len: int, dtype: torch.dtype,
                       force: bool = False) -> torch.Tensor | None:
        """Mask for queries at absolute positions ``q_pos`` (T,) over keys at positions ``0…kv_len-1``:
        bool (T, S), or float (nh, T, S) with ALiBi. None when SDPA needs none: plain causal
        attention over exactly these T tokens (is_causal), or one query over all keys so far."""
        cfg = self.config
        T = q_pos.shape[0]
        plain = cfg.position_embedding == "rope" and cfg.sliding_window is None
        if plain and not force and (kv_len == T or T == 1):
            return None
        k_pos = torch.arange(kv_len, device=q_pos.device)
        rel = k_pos[None, :] - q_pos[:, None]  # (T, S), ≤ 0 where visible
        ok = rel <= 0
        if cfg.sliding_window is not None:
            ok = ok & (rel > -cfg.sliding_window)
        if self._slopes is None:
            return ok  # bool (T, S)
        slopes = self._slopes.to(device=q_pos.device, dtype=torch.float32)
        bias = slopes[:, None, None] * rel[None].float()  # (nh, T, S) ALiBi: linear in distance
        return bias.masked_fill(~ok[None], float("-inf")).to(dtype)

    @staticmethod
    def with_padding(mask: torch.Tensor, keys: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """Hide padding keys: ``mask`` bool (T, S) or float (nh, T, S) from :meth:`attention_mask`,
        ``keys`` (B, S) bool (True: the slot holds a real token) → (B, 1|nh, T, S). A padding query
        still sees itself, so no row of the softmax is empty (its output is ignored, but a NaN there
        would reach later layers' values)."""
        S = keys.shape[1]
        itself = torch.arange(S, device=q_pos.device)[None, :] == q_pos[:, None]  # (T, S)
        keep = keys[:, None, None, :] | itself  # (B, 1, T, S)
        if mask.dtype == torch.bool:
            return mask & keep
        return mask.masked_fill(~keep, float("-inf"))  # (B, nh, T, S)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                input_pos: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) → hidden states (B, T, d). With a cache the tokens continue it; with a
        static-shape cache pass ``input_pos`` (T,) so no host sync is needed.

        ``attention_mask`` (B, T), 1/True for real tokens and 0/False for padding (transformers'
        convention, for the T new tokens only: a cache remembers its earlier padding). Pad on the
        left to generate. Positions are column indices; RoPE, ALiBi and sliding windows depend only
        on query − key distances, which a row's left padding does not change, so a padded row's real
        tokens get the same logits as the row alone (to rounding)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        if self.config.embedding_multiplier != 1.0:  # Granite
            x = x * self.config.embedding_multiplier
        B, T = x.shape[:2]
        keys = None  # (B, S) bool: which key slots hold real tokens; None: all of them
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, T):
                raise ShapeError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                                 f"(batch, new tokens) = ({B}, {T}), 1 for real tokens and 0 for padding")
            keys = attention_mask.to(device=x.device, dtype=torch.bool)
        static = cache is not None and cache.static_shapes
        if cache is None:
            input_pos = torch.arange(T, device=x.device) if input_pos is None else input_pos
            kv_len = T
        elif static:
            if input_pos is None:
                cache.check_room(T)
                input_pos = torch.arange(cache.length, cache.length + T, device=x.device)
            kv_len = cache.max_length  # every step sees the whole buffer; the mask hides the future
        else:
            cache.check_room(T)
            input_pos = torch.arange(cache.length, cache.length + T, device=x.device)
            kv_len = cache.length + T
        rope = None
        if self.config.position_embedding == "rope":
            seq_len = None  # dynamic scaling only: the length of the sequence so far
            if self.rope.dynamic:
                if cache is not None and not static:
                    seq_len = kv_len
                elif not (static and cache.max_length <= self.rope.initial):
                    seq_len = int(input_pos.max()) + 1  # a host sync: generate() runs such steps eagerly
            cos, sin = self.rope(input_pos, torch.float32, max_pos=kv_len, seq_len=seq_len)  # (T, hd) each
            rope = (cos.to(x.dtype), sin.to(x.dtype))
        if cache is not None:
            if keys is not None:
                cache.mark_keys(input_pos, keys)
            keys = None if cache.key_mask is None else cache.key_mask[:, :kv_len]
        mask = self.attention_mask(input_pos, kv_len, x.dtype, force=static or keys is not None)
        if keys is not None:
            mask = self.with_padding(mask, keys, input_pos)
        for layer in self.layers:
            x = layer(x, rope, mask, cache, input_pos)
        if cache is not None:
            cache.advance(T)  # bookkeeping only; a captured graph's caller tracks positions itself
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """``model`` (the trunk) + ``lm_head``. ``forward`` returns logits (B, T, vocab), or only the last
    ``num_logits`` positions' logits (generation needs one)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                input_pos: torch.Tensor | None = None, num_logits: int | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.model(input_ids, cache, input_pos, attention_mask=attention_mask)  # (B, T, d)
        if num_logits is not None:
            h = h[:, -num_logits:]
        return self.logits(h)  # (B, T', vocab)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (…, d) → logits (…, vocab): the output projection (÷ Granite's logits_scaling)."""
        y = _linear(self.lm_head, h)
        return y / self.config.logits_scaling if self.config.logits_scaling != 1.0 else y

    def new_cache(self, batch_size: int = 1, max_length: int | None = None,
                  static_shapes: bool = False) -> KVCache:
        from efficientml.llm.kv_cache import StaticKVCache

        return StaticKVCache.for_model(self, batch_size, max_length or self.config.max_position_embeddings,
                                       static_shapes=static_shapes)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype


def build_model(cfg: LlamaConfig, device: str | torch.device = "meta",
                dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Construct without allocating (``device="meta"``); a loader then fills it with
    ``load_state_dict(…, assign=True)``. Any other device gets randomly initialized weights."""
    old = torch.get_default_dtype()
    try:
        if dtype.is_floating_point:
            torch.set_default_dtype(dtype)  # allocate in the target dtype: no fp32 copy first
        with torch.device(device):
            m = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    if str(device) != "meta":
        init_weights(m)
    return m.to(dtype)


@torch.no_grad()
def init_weights(model: LlamaForCausalLM, std: float = 0.02, seed: int | None = None) -> None:
    """Normal(0, std) linears and embeddings, ones for norms, zero biases (for random-weight tests and
    speed benchmarks). With ``seed`` the values come from a CPU generator (reproducible anywhere);
    without, they are drawn in place on the weights' device (fast for large models)."""
    g = None
    if seed is not None:
        g = torch.Generator(device="cpu")
        g.manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            if mod is model.lm_head and model.config.tie_word_embeddings:
                continue
            if g is None:
                mod.weight.normal_(0.0, std)
            else:
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
            if getattr(mod, "bias", None) is not None:
                mod.bias.zero_()
        elif isinstance(mod, RMSNorm):
            mod.weight.fill_(1.0)
