"""Scaling groups as data, per architecture family.

A :class:`ScalingGroup` says which module's output feeds which linears inside one decoder block. AWQ
and SmoothQuant multiply those linears' input columns by a per-channel scale ``s`` and divide the
predecessor's output channels by ``s`` (an RMSNorm weight, or a linear's rows and bias), so the block
computes the same function before quantization. ``inspect`` names the module whose output measures
the error of a candidate scale (AWQ's grid search). A new architecture is a new entry here, not code.

Names are relative to a decoder block (Hugging Face Llama naming).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from efficientml.core.errors import UnsupportedError


@dataclass(frozen=True)
class ScalingGroup:
    prev: str                    # norm or linear whose output is the linears' input
    linears: tuple[str, ...]     # linears sharing that input, scaled jointly
    inspect: str                 # module run to compare outputs: "self_attn", "mlp" or a linear
    prev_is_norm: bool = True
    # a linear predecessor can only absorb 1/s when its output width equals the linears' input width
    # (v_proj → o_proj under grouped-query attention has n_kv·hd ≠ n_heads·hd; the group is skipped)
    needs_same_width: bool = False


_LLAMA = (
    ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", prev_is_norm=False,
                 needs_same_width=True),
    ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScalingGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", prev_is_norm=False),
)

# model_type → the block's scaling groups. Mistral, Qwen2, Qwen3, Phi-3 and Granite blocks are Llama blocks
# with other options: Qwen3's q/k norms act on q_proj / k_proj outputs, so scaling their inputs still folds
# into the input norm; Phi-3's fused qkv_proj / gate_up_proj are separate linears here, joined in the
# checkpoint; Granite's multipliers scale outside the linears.
FAMILIES: dict[str, tuple[ScalingGroup, ...]] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
                                                 "qwen3": _LLAMA, "phi3": _LLAMA, "granite": _LLAMA}

# every linear of a block that quantization touches, in execution order
BLOCK_LINEARS: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def family_of(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", None) or type(model).__name__)


def scaling_groups(model: nn.Module) -> tuple[ScalingGroup, ...]:
    """The scaling groups of ``model``'s family; :class:`UnsupportedError` for a family without one."""
    fam = family_of(model)
    if fam not in FAMILIES:
        raise UnsupportedError(f"model family {fam!r} has no scaling-group mapping; expected one of "
                               f"{', '.join(sorted(FAMILIES))} (add an entry to efficientml.llm.compress.mappings.FAMILIES)")
    return FAMILIES[fam]


def usable(group: ScalingGroup, block: nn.Module) -> bool:
    """Whether ``group`` applies to this block (shape conditions)."""
    if not group.needs_same_width:
        return True
    prev = block.get_submodule(group.prev)
    return all(prev.out_features == block.get_submodule(n).in_features for n in group.linears)
