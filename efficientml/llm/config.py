"""The one configuration of the decoder-only Transformer (LLaMA family), and its translation to and
from a Hugging Face ``config.json``.

Families are data (:mod:`efficientml.llm.arch`): its entry says which ``model_type`` values we read and
what each implies (Qwen2 has q/k/v biases, Mistral may have a sliding window, Granite's multipliers),
and which keys its config.json holds. Anything else in config.json is refused with
:class:`UnsupportedError` rather than guessed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from efficientml.core.errors import CheckpointError, ConfigError, UnsupportedError
from efficientml.llm import arch

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class LlamaConfig:
    """Shapes and options of one model. Defaults are SmolLM2-135M's."""

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    position_embedding: str = "rope"  # "rope" | "alibi"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"dynamic"|"llama3"|"yarn", "factor": …}
    partial_rotary_factor: float = 1.0  # RoPE turns the first rotary_dim of each head's dimensions (Phi-4-mini)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: a query sees at most this many keys (itself included)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's query and key (weights (hd,)) before RoPE
    # Granite: token embeddings × embedding_multiplier; attention scores × attention_multiplier (instead of
    # 1/sqrt(head dim)); each block's attention and MLP outputs × residual_multiplier; logits ÷ logits_scaling
    embedding_multiplier: float = 1.0
    attention_multiplier: float | None = None
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    hidden_act: str = "silu"
    # Mixture-of-Experts (efficientml.llm.moe): experts per block (0: a dense MLP), how many each token
    # uses, their width (None: intermediate_size), a shared expert's width (0: none), whether the top-k
    # router weights are renormalized, and the router ("token_choice" | "expert_choice")
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    router: str = "token_choice"
    model_type: str = "llama"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # unused HF keys, kept on save

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.head_dim is not None and (isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int)
                                          or self.head_dim <= 0):
            raise ConfigError(f"head_dim must be a positive integer or absent, got {self.head_dim!r}")
        for name in ("rms_norm_eps", "rope_theta", "partial_rotary_factor", "embedding_multiplier",
                     "residual_multiplier", "logits_scaling"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name} must be a finite positive number, got {v!r}")
        self._check_token_ids()
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                              f"({self.num_attention_heads}) when head_dim is not given")
        if self.position_embedding not in ("rope", "alibi"):
            raise ConfigError(f"position_embedding must be 'rope' or 'alibi', got {self.position_embedding!r}")
        if self.position_embedding == "rope" and self.dim_per_head % 2:
            raise ConfigError(f"RoPE needs an even head dimension, got {self.dim_per_head}")
        if self.hidden_act not in ("silu", "gelu", "gelu_pytorch_tanh"):
            raise UnsupportedError(f"activation {self.hidden_act!r} is not supported; expected silu or gelu")
        if self.rope_scaling is not None:
            kind = self.rope_type
            if kind not in ROPE_TYPES:
                raise UnsupportedError(f"rope scaling type {kind!r} is not supported; expected one of "
                                       f"{', '.join(ROPE_TYPES)}")
            if kind == "longrope":
                for key in ("short_factor", "long_factor"):
                    f = self.rope_scaling.get(key)
                    if not isinstance(f, (list, tuple)) or len(f) != self.rotary_dim // 2:
                        raise ConfigError(f"longrope {key} must list {self.rotary_dim // 2} factors (one per "
                                          f"rotary frequency), got {str(f)[:80]}")
            elif kind != "default" and float(self.rope_scaling.get("factor", 0)) <= 0:
                raise ConfigError(f"rope_scaling factor must be positive, got {self.rope_scaling.get('factor')!r}")
        if self.position_embedding == "rope" and (not 0 < self.partial_rotary_factor <= 1
                                                  or self.rotary_dim % 2 or self.rotary_dim == 0):
            raise ConfigError(f"partial_rotary_factor {self.partial_rotary_factor} must be in (0, 1] and leave an "
                              f"even, non-zero rotary dimension (head dim {self.dim_per_head})")
        if not self.logits_scaling > 0 or (self.attention_multiplier is not None
                                           and not self.attention_multiplier > 0):
            raise ConfigError(f"logits_scaling ({self.logits_scaling}) and attention_multiplier "
                              f"({self.attention_multiplier}) must be positive")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive or None, got {self.sliding_window}")
        self._check_moe()

    def _check_moe(self) -> None:
        E, k = self.num_experts, self.num_experts_per_tok
        if isinstance(E, bool) or not isinstance(E, int) or E < 0:
            raise ConfigError(f"num_experts must be an integer ≥ 0 (0: dense MLP blocks), got {E!r}")
        if E and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= E):
            raise ConfigError(f"num_experts_per_tok must be between 1 and num_experts ({E}), got {k!r}")
        for name, least in (("moe_intermediate_size", 1), ("shared_expert_intermediate_size", 0)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
                raise ConfigError(f"{name} must be an integer ≥ {least}, got {v!r}")
        if self.router not in ("token_choice", "expert_choice"):
            raise ConfigError(f"router must be 'token_choice' or 'expert_choice', got {self.router!r}")

    def _check_token_ids(self) -> None:
        eos = self.eos_token_id if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]
        for name, ids in (("bos_token_id", [self.bos_token_id]), ("eos_token_id", eos),
                          ("pad_token_id", [self.pad_token_id])):
            for t in ids:
                if t is None:
                    continue
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                    raise ConfigError(f"{name} {t!r} is not a token id of the vocabulary (0 to "
                                      f"{self.vocab_size - 1})")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def family(self) -> arch.Family:
        """This model's family entry (:mod:`efficientml.llm.arch`); UnsupportedError for an unknown one."""
        return arch.get(self.model_type)

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def attention_scale(self) -> float:
        """What attention scores are multiplied by: attention_multiplier (Granite), else 1/sqrt(head dim)."""
        return self.attention_multiplier if self.attention_multiplier is not None else self.dim_per_head ** -0.5

    @property
    def rotary_dim(self) -> int:
        """How many of each head's dimensions RoPE turns (the first ones); the rest pass unrotated."""
        return int(self.dim_per_head * self.partial_rotary_factor)

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        kind = str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))
        return "longrope" if kind == "su" else kind  # Phi-3's first 128k configs call LongRoPE "su"

    @property
    def rope_original_context(self) -> int:
        """The context the model was pretrained at (LongRoPE switches factors beyond it; Phi-3 keeps it
        at the top level of config.json)."""
        sc = self.rope_scaling or {}
        v = sc.get("original_max_position_embeddings") or self.extra.get("original_max_position_embeddings")
        return int(v) if v else self.max_position_embeddings

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [int(e)] if isinstance(e, int) else [int(x) for x in e]

    def num_parameters(self) -> int:
        """Weights of the model this config builds (biases included; a tied head counted once)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.dim_per_head
        nh, nkv = self.num_attention_heads, self.num_key_value_heads
        attn = d * hd * (nh * 2 + nkv * 2) + (hd * (nh + 2 * nkv) if self.attention_bias else 0) \
            + (d if self.o_bias else 0)

        def mlp(width: int) -> int:
            return 3 * d * width + ((2 * width + d) if self.mlp_bias else 0)

        ffn = mlp(f)
        if self.num_experts:  # router + experts + shared expert and its gate
            s = self.shared_expert_intermediate_size
            ffn = d * self.num_experts + self.num_experts * mlp(self.expert_intermediate_size) \
                + (mlp(s) + d if s else 0)
        block = attn + ffn + 2 * d + (2 * hd if self.qk_norm else 0)
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * block + emb + d

    # --- Hugging Face config.json ---------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
        mt = d.get("model_type")
        if mt not in arch.names():
            raise UnsupportedError(
                f"{source}: model_type {mt!r} (architectures {d.get('architectures')}) is not supported; expected "
                f"one of {', '.join(arch.names())} (a new family is an entry in {arch.family.WHERE})")
        fam = arch.get(mt)
        # qk_norm is no config.json key (Qwen3 implies it)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "position_embedding", "o_bias", "qk_norm",
                                                             "router"}
        ours = {theirs: name for name, theirs in fam.hf_names.items()}  # Mixtral's num_local_experts
        d = {ours.get(k, k): v for k, v in d.items()}
        for key, only in fam.hf_requires.items():
            if key in d and d[key] != only:
                raise UnsupportedError(f"{source}: {key}={d[key]!r} is not supported for {fam.display}; "
                                       f"expected {only!r}")
        kw: dict[str, Any] = {k: d[k] for k in known if k in d}
        for k, v in fam.defaults.items():
            kw.setdefault(k, v)
        kw.update(fam.fixed)
        if fam.use_sliding_window is not None and not d.get("use_sliding_window", fam.use_sliding_window):
            kw["sliding_window"] = None
        # transformers ≥ 5 may nest rope settings under "rope_parameters"
        rp = d.get("rope_parameters")
        if isinstance(rp, dict):
            if "rope_theta" in rp:
                kw["rope_theta"] = rp["rope_theta"]
            if "partial_rotary_factor" in rp and "partial_rotary_factor" not in d:
                kw["partial_rotary_factor"] = rp["partial_rotary_factor"]
            if rp.get("rope_type", "default") != "default":
                kw["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        if isinstance(kw.get("rope_scaling"), dict) and kw["rope_scaling"].get(
                "rope_type", kw["rope_scaling"].get("type")) == "default":
            kw["rope_scaling"] = None
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in kw]
        if missing:
            raise CheckpointError(f"{source} lacks required keys {missing}")
        kw.setdefault("num_key_value_heads", kw["num_attention_heads"])
        kw.setdefault("tie_word_embeddings", False)
        kw.setdefault("rms_norm_eps", 1e-6)
        kw.setdefault("rope_theta", 10000.0)
        extra = {k: v for k, v in d.items() if k not in known and k not in ("rope_parameters",)}
        try:
            return cls(**kw, extra=extra)
        except (TypeError, ConfigError) as e:
            raise CheckpointError(f"{source} has a wrong value: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        from efficientml.core.paths import require_file

        path = require_file(path, "model configuration")
        try:
            d = json.loads(path.read_text())
        except OSError as e:
            raise CheckpointError(f"{str(path)!r} cannot be read ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{str(path)!r} is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{str(path)!r} must hold a JSON object")
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        if self.position_embedding != "rope":
            raise UnsupportedError("a model with ALiBi has no Hugging Face Llama config.json equivalent")
        if self.o_bias:
            raise UnsupportedError("a model with an o_proj bias has no Hugging Face Llama config.json equivalent")
        fam = self.family
        self._check_family_fields(fam)
        if fam.fused and (self.attention_bias or self.mlp_bias):
            raise UnsupportedError(f"{fam.display}'s fused {' / '.join(f.name.split('.')[-1] for f in fam.fused)} "
                                   "have no biases")
        d: dict[str, Any] = {k: v for k, v in self.extra.items()
                             if k not in ("transformers_version", "torch_dtype", "dtype")}
        d.update({
            "architectures": [fam.hf_class], "model_type": self.model_type, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.dim_per_head,
            "rms_norm_eps": self.rms_norm_eps, "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id, "torch_dtype": "float32",
        })
        for k in fam.hf_keys:  # the family's own keys
            d[fam.hf_names.get(k, k)] = (self.sliding_window is not None if k == "use_sliding_window"
                    else self.attention_scale if k == "attention_multiplier" else getattr(self, k))
        return d

    def _check_family_fields(self, fam: arch.Family) -> None:
        """Refuse options only other families' config.json can express (Granite's multipliers, …)."""
        for k, v in fam.fixed.items():
            if getattr(self, k) != v:
                raise UnsupportedError(f"{k}={getattr(self, k)} with model_type {self.model_type!r} has no Hugging "
                                       f"Face config.json equivalent ({fam.display} implies {k}={v})")
        bad = [k for k, neutral in arch.FAMILY_FIELDS.items() if k not in fam.allows and getattr(self, k) != neutral]
        if bad:
            what = arch.FIELD_WHAT[bad[0]]
            same = [k for k in bad if arch.FIELD_WHAT[k] == what]
            owners = " / ".join(f.display for f in arch.entries() if bad[0] in f.allows) or "no family"
            raise UnsupportedError(f"{ {k: getattr(self, k) for k in same} } with model_type {self.model_type!r} "
                                   f"has no Hugging Face config.json equivalent ({what} are {owners}'s)")

    def replace(self, **kw: Any) -> "LlamaConfig":
        return dataclasses.replace(self, **kw)


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi head slopes (Press et al. 2022): a geometric sequence starting at 2^(-8/n); for a head
    count that is not a power of two, the closest power's slopes plus every other slope of the next."""
    def pow2(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return pow2(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return pow2(closest) + pow2(2 * closest)[0::2][: n_heads - closest]
