"""Prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021): trainable virtual tokens in
front of every sequence, through the model's KV cache; the base model is frozen.

- Prompt tuning: ``n`` soft embeddings (n, d) run through every layer as if they were the first ``n``
  input tokens; their keys/values start the cache.
- Prefix tuning: each layer's keys and values for the ``n`` prefix slots are parameters themselves,
  (layers, 2, n_kv_heads, n, head_dim); optionally produced by a reparametrisation MLP from an
  (n, kv) embedding (``projection=True``, the paper's stabiliser: kv → hidden → tanh → layers·2·kv,
  kv = n_kv_heads·head_dim, PEFT's layout and names, so its prefix weights load unchanged).

Both are a ``model.virtual_tokens`` module: ``model(ids)`` without a cache starts from a cache holding
the virtual tokens (so training code is unchanged), ``model.new_cache(...)`` starts with them (so
``generate`` works). The real tokens take positions n, n+1, …, as after a real prompt of n tokens.
The virtual tokens produce no logits, so labels need no padding for them: the loss is over the real
tokens' positions exactly as without them (PEFT pads labels with -100 for the same effect).

    apply(model, PromptTuningConfig(num_virtual_tokens=20), inplace=True)
    apply(model, PrefixTuningConfig(num_virtual_tokens=20, projection=True), inplace=True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from efficientml.core.config import Config, check_choice
from efficientml.core.errors import ConfigError
from efficientml.core.transform import LayerFilter, TransformResult, register_transform
from efficientml.finetune.inject import trainable_parameters
from efficientml.finetune.targets import freeze
from efficientml.llm.kv_cache import KVCache, StaticKVCache

INITS = ("random", "vocab", "tokens")


class ConcatKVCache(KVCache):
    """A cache for training through virtual tokens: keys/values are concatenated, never written in
    place (autograd keeps the prefix's graph), and rewritten from ``input_pos`` so a checkpointed
    block that recomputes its forward gets the same tensors."""

    def __init__(self, num_layers: int, batch_size: int, max_length: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.batch_size, self.max_length, self.length = batch_size, max_length, 0

    def update(self, layer_idx, k, v, input_pos):
        start = int(input_pos[0]) if input_pos.numel() else self.length
        old_k, old_v = self.k[layer_idx], self.v[layer_idx]
        if old_k is not None and start > 0:
            k, v = torch.cat([old_k[:, :, :start], k], 2), torch.cat([old_v[:, :, :start], v], 2)
        self.k[layer_idx], self.v[layer_idx] = k, v
        return k, v  # (B, n_kv, start+T, hd)


@dataclass(frozen=True)
class PromptTuningConfig(Config):
    """``init``: "vocab" (rows of the embedding matrix, drawn at random: Lester et al.'s sampled-vocab
    init), "random" (N(0, σ²) with σ the embedding matrix's std), "tokens" (the embeddings of
    ``init_token_ids``, e.g. a tokenized task description: PEFT's TEXT init)."""

    kind = "prompt_tuning"
    num_virtual_tokens: int = 20
    init: str = "vocab"
    init_token_ids: tuple[int, ...] = ()
    seed: int = 0

    def validate(self) -> None:
        _check_virtual(self.num_virtual_tokens, self.init, self.init_token_ids)


@dataclass(frozen=True)
class PrefixTuningConfig(Config):
    """``projection``: the reparametrisation MLP (``encoder_hidden_size``, default n_kv_heads·head_dim).
    ``init`` ("random", "tokens"): "tokens" starts every layer's prefix as the base model's own keys
    and values for ``init_token_ids`` (no projection), so the model starts as base(tokens + input)."""

    kind = "prefix_tuning"
    num_virtual_tokens: int = 20
    projection: bool = False
    encoder_hidden_size: int | None = None
    init: str = "random"
    init_token_ids: tuple[int, ...] = ()
    seed: int = 0

    def validate(self) -> None:
        _check_virtual(self.num_virtual_tokens, self.init, self.init_token_ids)
        if self.init == "vocab":
            raise ConfigError("prefix tuning init must be 'random' or 'tokens', got 'vocab'")
        if self.projection and self.init == "tokens":
            raise ConfigError("init='tokens' sets the prefix keys/values directly; it cannot pass through "
                              "the projection MLP: use projection=False or init='random'")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ConfigError(f"encoder_hidden_size must be a positive integer, got {self.encoder_hidden_size!r}")


def _check_virtual(n: int, init: str, ids: tuple[int, ...]) -> None:
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"num_virtual_tokens must be a positive integer, got {n!r}")
    check_choice("init", init, INITS)
    if init == "tokens" and len(ids) != n:
        raise ConfigError(f"init='tokens' needs init_token_ids of length num_virtual_tokens={n}, got {len(ids)}")


class _VirtualTokens(nn.Module):
    """What ``LlamaForCausalLM`` calls: ``cache(model, B)`` for a forward without a cache,
    ``fill(model, cache)`` for a new inference cache."""

    num_virtual_tokens: int

    def cache(self, model: nn.Module, batch_size: int) -> ConcatKVCache:
        cfg = model.config
        c = ConcatKVCache(cfg.num_hidden_layers, batch_size, self.num_virtual_tokens + cfg.max_position_embeddings)
        self.fill(model, c)
        return c

    def fill(self, model: nn.Module, cache: KVCache) -> None:
        raise NotImplementedError


class PromptEmbedding(_VirtualTokens):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.num_virtual_tokens = weight.shape[0]
        self.embedding = nn.Parameter(weight)  # (n, d)

    def fill(self, model: nn.Module, cache: KVCache) -> None:
        if cache.length:
            raise ConfigError("the virtual tokens go first: fill an empty cache")
        B = getattr(cache, "batch_size", 1)
        x = self.embedding[None].expand(B, -1, -1)  # (B, n, d)
        model.model(None, cache, inputs_embeds=x)  # the trunk only: n virtual tokens into the cache


class PrefixEncoder(_VirtualTokens):
    """Per-layer prefix keys/values, (layers, 2, n_kv, n, hd), direct or through the MLP."""

    def __init__(self, cfg, n: int, projection: bool, hidden: int | None, device, dtype,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.num_virtual_tokens, L = n, cfg.num_hidden_layers
        self.shape = (n, L, 2, cfg.num_key_value_heads, cfg.dim_per_head)
        token = cfg.num_key_value_heads * cfg.dim_per_head  # one layer's key (or value) width
        width = L * 2 * token
        d = token if projection else width
        self.embedding = nn.Parameter(torch.randn(n, d, generator=generator).to(device, dtype))
        self.transform = None
        if projection:  # PEFT's PrefixEncoder: token → hidden → tanh → layers·2·token
            h = hidden or token
            with torch.random.fork_rng(devices=[]):  # nn.Linear's init from the config's seed
                torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
                self.transform = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, width)).to(device, dtype)

    def key_values(self) -> torch.Tensor:
        e = self.embedding if self.transform is None else self.transform(self.embedding)  # (n, width)
        return e.view(self.shape).permute(1, 2, 3, 0, 4)  # (L, 2, n_kv, n, hd)

    def fill(self, model: nn.Module, cache: KVCache) -> None:
        if cache.length:
            raise ConfigError("the virtual tokens go first: fill an empty cache")
        B, n = getattr(cache, "batch_size", 1), self.num_virtual_tokens
        kv = self.key_values()
        pos = torch.arange(n, device=kv.device)
        for layer in range(kv.shape[0]):
            k, v = (t[None].expand(B, -1, -1, -1) for t in kv[layer])  # (B, n_kv, n, hd) each
            cache.update(layer, k, v, pos)
        cache.advance(n)


def _embedding_init(model: nn.Module, config: PromptTuningConfig, g: torch.Generator) -> torch.Tensor:
    emb = model.model.embed_tokens.weight.detach()
    if config.init == "tokens":
        return emb[torch.tensor(config.init_token_ids, device=emb.device)].clone()
    if config.init == "vocab":
        rows = torch.randint(0, emb.shape[0], (config.num_virtual_tokens,), generator=g)
        return emb[rows.to(emb.device)].clone()
    return (torch.randn(config.num_virtual_tokens, emb.shape[1], generator=g) * emb.float().std()).to(emb)


@torch.no_grad()
def _token_key_values(model: nn.Module, ids: tuple[int, ...]) -> torch.Tensor:
    """The base model's keys/values for ``ids``, as one prefix embedding row per token (n, width)."""
    cache = StaticKVCache.for_model(model, 1, len(ids))
    model.model(torch.tensor([ids], device=model.device), cache)
    kv = torch.stack([cache.k[:, 0], cache.v[:, 0]], 1)  # (L, 2, n_kv, n, hd)
    return kv.permute(3, 0, 1, 2, 4).reshape(len(ids), -1)


def _check_model(model: nn.Module, config: Config) -> None:
    if not hasattr(model, "virtual_tokens") or not hasattr(getattr(model, "model", None), "embed_tokens"):
        raise ConfigError(f"prompt and prefix tuning need efficientml's LlamaForCausalLM (its KV cache); got "
                          f"{type(model).__name__}")
    if model.virtual_tokens is not None:
        raise ConfigError("the model already has virtual tokens (prompt or prefix tuning); use a fresh base")
    for i in config.init_token_ids:
        if not 0 <= i < model.config.vocab_size:
            raise ConfigError(f"init_token_ids holds {i}, outside the vocabulary [0, {model.config.vocab_size})")


def _install(model: nn.Module, module: _VirtualTokens, config: Config) -> TransformResult:
    freeze(model)
    model.virtual_tokens = module
    return TransformResult(model, config, "real", {"virtual_tokens": {"n": module.num_virtual_tokens}},
                           {"trainable": trainable_parameters(model)})


@register_transform(PromptTuningConfig)
def apply_prompt_tuning(model: nn.Module, config: PromptTuningConfig, *, calib=None,
                        filter: LayerFilter) -> TransformResult:
    """Soft prompt embeddings in front of every sequence (calib and filter are not used)."""
    _check_model(model, config)
    g = torch.Generator().manual_seed(config.seed)
    return _install(model, PromptEmbedding(_embedding_init(model, config, g)), config)


@register_transform(PrefixTuningConfig)
def apply_prefix_tuning(model: nn.Module, config: PrefixTuningConfig, *, calib=None,
                        filter: LayerFilter) -> TransformResult:
    """Per-layer key/value prefixes (calib and filter are not used)."""
    _check_model(model, config)
    g = torch.Generator().manual_seed(config.seed)
    p = next(model.parameters())
    enc = PrefixEncoder(model.config, config.num_virtual_tokens, config.projection, config.encoder_hidden_size,
                        p.device, p.dtype, g)
    if config.init == "tokens":
        with torch.no_grad():
            enc.embedding.copy_(_token_key_values(model, config.init_token_ids))
    return _install(model, enc, config)
