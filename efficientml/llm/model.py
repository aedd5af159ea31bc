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
The model has no kernel dispatch: kernels are modules swapped in by ``efficientml.llm.kernels``. A
block's ``fusable`` linears (q/k/v, gate/up) read the same input, and its ``packed`` slot (None here)
may hold one module that runs them as one matmul (:func:`fused_call`); the loaders install it
(``kernels.packed.pack_projections``: row views of one buffer, same names and ``state_dict``). For
batch-1 decoding ``kernels.decode.use_cpu_gemv`` / ``use_gpu_gemv`` swap the linears for
matrix-vector-kernel ones (``prepare_cpu_decode`` picks the CPU path). RoPE lives in
:mod:`efficientml.llm.rope`.

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

import torch
import torch.nn.functional as F
from torch import nn

from efficientml.core.errors import ShapeError
from efficientml.llm.config import LlamaConfig, alibi_slopes
from efficientml.llm.kv_cache import KVCache
from efficientml.llm.moe import SparseMoeBlock
from efficientml.llm.rope import Rotary, apply_rope

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


def fused_call(packed: nn.Module | None, x: torch.Tensor,
               mods: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...] | None:
    """The outputs of ``mods`` on ``x`` from one fused module, or None: run them one by one. A block's
    ``packed`` module (any module called as ``packed(x, mods)``; None by default) may run its linears
    that read the same input as one matmul, and answers None whenever it cannot stand for them."""
    return None if packed is None else packed(x, mods)


class Attention(nn.Module):
    fusable = ("q_proj", "k_proj", "v_proj")  # read the same input: may run as one matmul (packed)

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
        self.packed: nn.Module | None = None  # installed at load: q, k, v as one matmul (fused_call)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                attn_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = fused_call(self.packed, x, (self.q_proj, self.k_proj, self.v_proj))
        q, k, v = qkv if qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        if self.q_norm is not None:  # per head, over hd
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            cos, sin = rope  # type: ignore[misc]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None and cache.attends:  # a paged cache stores k/v and attends per sequence itself
            return self.o_proj(cache.attend(self.layer_idx, q, k, v, self.scale))  # (1, T, nh*hd)
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
        return self.o_proj(o)


class MLP(nn.Module):
    fusable = ("gate_proj", "up_proj")

    def __init__(self, cfg: LlamaConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        d, f = cfg.hidden_size, intermediate_size or cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=cfg.mlp_bias)
        self.act = {"silu": F.silu, "gelu": F.gelu,
                    "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh")}[cfg.hidden_act]
        self.packed: nn.Module | None = None  # installed at load: gate, up as one matmul (fused_call)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = fused_call(self.packed, x, (self.gate_proj, self.up_proj))
        g, u = gu if gu is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(self.act(g) * u)  # SwiGLU


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``h + mlp(norm(h))``. See the module docstring for
    the call signature used when running one block alone."""

    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoeBlock(cfg, MLP) if cfg.num_experts else MLP(cfg)  # MoE: efficientml.llm.moe
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

    def _rope(self, input_pos: torch.Tensor, kv_len: int, cache: KVCache | None, static: bool,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos/sin (T, hd) at ``input_pos`` in ``dtype``, or None without RoPE."""
        if self.config.position_embedding != "rope":
            return None
        seq_len = None  # dynamic scaling only: the length of the sequence so far
        if self.rope.dynamic:
            if cache is not None and not static:
                seq_len = kv_len
            elif not (static and cache.max_length <= self.rope.initial):
                seq_len = int(input_pos.max()) + 1  # a host sync: generate() runs such steps eagerly
        cos, sin = self.rope(input_pos, torch.float32, max_pos=kv_len, seq_len=seq_len)  # (T, hd) each
        return cos.to(dtype), sin.to(dtype)

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
        paged = cache is not None and cache.attends
        if cache is None:
            input_pos = torch.arange(T, device=x.device) if input_pos is None else input_pos
            kv_len = T
        elif paged:  # ragged sequences flattened into one row: each token's own position, from the caller
            if input_pos is None:  # a one-sequence cache starts its step; a ragged batch's caller plans it
                input_pos = cache.next_positions(T)
            kv_len = cache.length  # the longest context of this batch
        elif static:
            if input_pos is None:
                cache.check_room(T)
                input_pos = torch.arange(cache.length, cache.length + T, device=x.device)
            kv_len = cache.max_length  # every step sees the whole buffer; the mask hides the future
        else:
            cache.check_room(T)
            input_pos = torch.arange(cache.length, cache.length + T, device=x.device)
            kv_len = cache.length + T
        rope = self._rope(input_pos, kv_len, cache, static, x.dtype)
        if cache is not None and not paged:
            if keys is not None:
                cache.mark_keys(input_pos, keys)
            keys = None if cache.key_mask is None else cache.key_mask[:, :kv_len]
        mask = None if paged else self.attention_mask(input_pos, kv_len, x.dtype, force=static or keys is not None)
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
        self.virtual_tokens: nn.Module | None = None  # prompt / prefix tuning (efficientml.finetune.prompt)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):  # not a kernel module
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                input_pos: torch.Tensor | None = None, num_logits: int | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if cache is None and self.virtual_tokens is not None:  # a cache holding the virtual tokens' K/V
            cache = self.virtual_tokens.cache(self, input_ids.shape[0])
        h = self.model(input_ids, cache, input_pos, attention_mask=attention_mask)  # (B, T, d)
        if num_logits is not None:
            h = h[:, -num_logits:]
        return self.logits(h)  # (B, T', vocab)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (…, d) → logits (…, vocab): the output projection (÷ Granite's logits_scaling)."""
        y = self.lm_head(h)
        return y / self.config.logits_scaling if self.config.logits_scaling != 1.0 else y

    def new_cache(self, batch_size: int = 1, max_length: int | None = None,
                  static_shapes: bool = False) -> KVCache:
        from efficientml.llm.kv_cache import StaticKVCache

        n = max_length or self.config.max_position_embeddings
        factory = getattr(self, "kv_cache_factory", None)  # set by apply(model, KVCacheQuantConfig(...))
        vt = getattr(self, "virtual_tokens", None)
        n = n + (vt.num_virtual_tokens if vt is not None else 0)
        if factory is not None:
            cache = factory(self, batch_size, n, static_shapes)
        else:
            cache = StaticKVCache.for_model(self, batch_size, n, static_shapes=static_shapes)
        if vt is not None:  # prompt / prefix tuning: the cache starts with the virtual tokens
            vt.fill(self, cache)
        return cache

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
