"""Scaling groups, read from each family's entry (:attr:`efficientml.llm.arch.Family.scaling_groups`).

A :class:`ScalingGroup` says which module's output feeds which linears inside one decoder block. AWQ
and SmoothQuant multiply those linears' input columns by a per-channel scale ``s`` and divide the
predecessor's output channels by ``s`` (an RMSNorm weight, or a linear's rows and bias), so the block
computes the same function before quantization. ``inspect`` names the module whose output measures
the error of a candidate scale (AWQ's grid search). A new architecture is a new family entry, not code.

Names are relative to a decoder block (Hugging Face Llama naming).
"""

from __future__ import annotations

from torch import nn

from efficientml.core.errors import UnsupportedError
from efficientml.llm import arch
from efficientml.llm.arch import ScalingGroup

__all__ = ["BLOCK_LINEARS", "ScalingGroup", "family_of", "scaling_groups", "usable"]

# every linear of a block that quantization touches, in execution order
BLOCK_LINEARS: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def family_of(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", None) or type(model).__name__)


def scaling_groups(model: nn.Module) -> tuple[ScalingGroup, ...]:
    """The scaling groups of ``model``'s family; :class:`UnsupportedError` for a family without one."""
    fam = family_of(model)
    if fam not in arch.names() or not arch.get(fam).scaling_groups:
        raise UnsupportedError(f"model family {fam!r} has no scaling-group mapping; expected one of "
                               f"{', '.join(sorted(arch.names()))} (add an entry in {arch.family.WHERE})")
    return arch.get(fam).scaling_groups


def usable(group: ScalingGroup, block: nn.Module) -> bool:
    """Whether ``group`` applies to this block (shape conditions)."""
    if not group.needs_same_width:
        return True
    prev = block.get_submodule(group.prev)
    return all(prev.out_features == block.get_submodule(n).in_features for n in group.linears)
