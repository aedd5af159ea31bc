"""What a model family is, as data: :class:`Family` (one per Hugging Face ``model_type``), its GGUF form
(:class:`GGUFForm`), its fused checkpoint projections (:class:`FusedProjection`) and its AWQ/SmoothQuant
scaling groups (:class:`ScalingGroup`); and the registry every llm module looks families up in.

Nothing here imports the rest of ``efficientml.llm``: the config parser, both GGUF directions, the HF
writer, fused-name handling and the compression mappings read these fields instead of testing
``model_type`` strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from efficientml.core.errors import ConfigError, UnsupportedError

WHERE = "efficientml/llm/arch/families.py (or efficientml.llm.arch.register)"

# Config fields only some families' config.json can express, with the value every other family must
# keep (the value that changes nothing). A family lists the ones it has in ``Family.allows``.
FAMILY_FIELDS: Mapping[str, Any] = MappingProxyType({
    "embedding_multiplier": 1.0, "attention_multiplier": None, "residual_multiplier": 1.0,
    "logits_scaling": 1.0,  # Granite's four scalars
    "partial_rotary_factor": 1.0,  # RoPE on part of each head (Phi-3 / Phi-4-mini)
    "qk_norm": False,  # RMSNorm on each head's q and k (Qwen3)
    "num_experts": 0,  # Mixture-of-Experts feed-forward blocks (Mixtral, Qwen2-MoE)
    "shared_expert_intermediate_size": 0,  # an expert every token uses (Qwen2-MoE)
    "router": "token_choice",  # expert-choice routing has no config.json form
})
# what those fields are, in messages
FIELD_WHAT = {"embedding_multiplier": "these multipliers", "attention_multiplier": "these multipliers",
              "residual_multiplier": "these multipliers", "logits_scaling": "these multipliers",
              "partial_rotary_factor": "partial rotary embeddings", "qk_norm": "q/k norms",
              "num_experts": "Mixture-of-Experts blocks", "shared_expert_intermediate_size": "shared experts",
              "router": "expert-choice routers"}

# config.json keys a family may write beyond the common ones (Family.hf_keys); "use_sliding_window" is
# derived (a window is set), the others are LlamaConfig fields
HF_KEYS = ("attention_bias", "mlp_bias", "sliding_window", "use_sliding_window", "num_experts_per_tok",
           "moe_intermediate_size", "norm_topk_prob", *FAMILY_FIELDS)

# how many output rows one part of a fused projection holds, by the kind of part
ROW_WIDTHS = {
    "q": lambda cfg: cfg.num_attention_heads * cfg.dim_per_head,
    "kv": lambda cfg: cfg.num_key_value_heads * cfg.dim_per_head,
    "ffn": lambda cfg: cfg.intermediate_size,
}


@dataclass(frozen=True)
class ScalingGroup:
    """Which module's output feeds which linears inside one decoder block (names relative to the block)."""

    prev: str                    # norm or linear whose output is the linears' input
    linears: tuple[str, ...]     # linears sharing that input, scaled jointly
    inspect: str                 # module run to compare outputs: "self_attn", "mlp" or a linear
    prev_is_norm: bool = True
    # a linear predecessor can only absorb 1/s when its output width equals the linears' input width
    # (v_proj → o_proj under grouped-query attention has n_kv·hd ≠ n_heads·hd; the group is skipped)
    needs_same_width: bool = False


@dataclass(frozen=True)
class FusedProjection:
    """One linear of the checkpoint that our model keeps as separate linears (rows in ``parts`` order)."""

    name: str                    # in the checkpoint, relative to a block: "self_attn.qkv_proj"
    parts: tuple[str, ...]       # our linears, in row order: ("self_attn.q_proj", …)
    widths: tuple[str, ...]      # each part's row count, a ROW_WIDTHS key: ("q", "kv", "kv")
    gguf: str | None = None      # its GGUF tensor name ("attn_qkv"); None: GGUF keeps the parts apart

    def rows(self, cfg: Any) -> list[int]:
        """The output rows each part holds under ``cfg`` (a LlamaConfig)."""
        return [ROW_WIDTHS[w](cfg) for w in self.widths]


@dataclass(frozen=True)
class GGUFForm:
    """How a family is laid out in GGUF, as llama.cpp's converter writes it."""

    arch: str                    # general.architecture written for the family
    reads: bool = True           # files of that architecture read back as this family
    permute_qk: bool = False     # Q/K rows interleaved per head (llama.cpp permutes llama-style archs)
    qkv_bias: bool = False       # q/k/v biases are written (qwen2, qwen3)
    qk_norm: bool = False        # q/k norm tensors are written (qwen3)
    rope_dim_is_rotary: bool = False  # rope.dimension_count is the rotary part of the head (phi3)
    longrope: bool = False       # LongRoPE factors as rope_factors_long/short tensors (phi3)
    rope_types: tuple[str, ...] = ("default", "linear", "llama3")  # RoPE scalings written
    # family-specific metadata: LlamaConfig field → key under "{arch}." (read and written)
    keys: Mapping[str, str] = field(default_factory=dict)
    # other general.architecture values read as this family, with the extra keys each has
    aliases: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """One model family, keyed by its Hugging Face ``model_type``."""

    model_type: str
    hf_class: str                # config.json "architectures": ["LlamaForCausalLM"]
    display: str                 # the family's name in messages: "Phi-3"
    scaling_groups: tuple[ScalingGroup, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)  # implied when config.json omits them
    fixed: Mapping[str, Any] = field(default_factory=dict)     # implied always (not read from config.json)
    allows: frozenset[str] = frozenset()  # FAMILY_FIELDS this family's config.json has
    hf_keys: tuple[str, ...] = ()  # HF_KEYS written to its config.json, beyond the common ones
    # config.json's use_sliding_window when absent (None: the key is not read; a window is as given)
    use_sliding_window: bool | None = None
    fused: tuple[FusedProjection, ...] = ()  # projections the checkpoint stores fused
    # config.json names of our fields where they differ: {"num_experts": "num_local_experts"} (Mixtral)
    hf_names: Mapping[str, str] = field(default_factory=dict)
    # (checkpoint, ours) fragments of weight names, replaced in order at load, back on save
    weight_renames: tuple[tuple[str, str], ...] = ()
    # config.json keys whose only supported value is the one given (Qwen2-MoE's decoder_sparse_step: 1)
    hf_requires: Mapping[str, Any] = field(default_factory=dict)
    gguf: GGUFForm | None = None  # None: GGUF writing and reading refuse the family

    def fused_in_gguf(self) -> tuple[FusedProjection, ...]:
        return tuple(f for f in self.fused if f.gguf is not None)


_FAMILIES: dict[str, Family] = {}


def register(family: Family, replace: bool = False) -> Family:
    """Add a family (``replace``: overwrite an entry of the same model_type)."""
    if family.model_type in _FAMILIES and not replace:
        raise ConfigError(f"model family {family.model_type!r} is already registered; pass replace=True")
    bad = (set(family.allows) - set(FAMILY_FIELDS)) | (set(family.hf_keys) - set(HF_KEYS))
    if bad:
        raise ConfigError(f"family {family.model_type!r} names unknown config fields {sorted(bad)}; expected "
                          f"fields of {sorted(set(FAMILY_FIELDS) | set(HF_KEYS))}")
    _FAMILIES[family.model_type] = family
    return family


def unregister(model_type: str) -> None:
    _FAMILIES.pop(model_type, None)


def names() -> list[str]:
    return list(_FAMILIES)


def entries() -> tuple[Family, ...]:
    return tuple(_FAMILIES.values())


def get(model_type: Any, source: str = "") -> Family:
    """The family of a ``model_type``; :class:`UnsupportedError` saying where to add one."""
    fam = _FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if fam is None:
        where = f"{source}: " if source else ""
        raise UnsupportedError(f"{where}model_type {model_type!r} is not supported; expected one of "
                               f"{', '.join(_FAMILIES)} (a new family is an entry in {WHERE})")
    return fam


def gguf_archs() -> dict[str, tuple[Family, Mapping[str, str]]]:
    """general.architecture → (the family its files read as, that name's family-specific keys)."""
    out: dict[str, tuple[Family, Mapping[str, str]]] = {}
    for fam in _FAMILIES.values():
        if fam.gguf is not None and fam.gguf.reads:
            out[fam.gguf.arch] = (fam, fam.gguf.keys)
            out.update({a: (fam, keys) for a, keys in fam.gguf.aliases.items()})
    return out


def by_gguf(arch: str, source: str = "") -> tuple[Family, Mapping[str, str]]:
    """The family a GGUF file of architecture ``arch`` reads as, and the metadata keys it carries."""
    table = gguf_archs()
    if arch not in table:
        where = f"{source}: " if source else ""
        raise UnsupportedError(f"{where}GGUF architecture {arch!r} is not supported; expected one of "
                               f"{', '.join(table)} (a new family is an entry in {WHERE})")
    return table[arch]
