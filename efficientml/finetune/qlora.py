"""QLoRA: LoRA over a frozen base stored in packed NF4 with double-quantized scales.

    result = efficientml.apply(model, QLoRAConfig(rank=16, alpha=32), inplace=True)

Every targeted linear becomes ``LoRALinear(NF4Linear(W))``: the float weight is dropped, the codes
(4 bits) and the double-quantized block scales stay (see :mod:`efficientml.finetune.nf4`). Layers
that are not targeted (embeddings, norms, an untied ``lm_head``) stay as they were. Pair it with
8-bit optimizer states (:class:`efficientml.finetune.optim8bit.AdamW8bit`) when memory is short.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from efficientml.core.errors import ConfigError
from efficientml.core.memory import release_memory
from efficientml.core.transform import LayerFilter, TransformResult, register_transform
from efficientml.finetune.inject import inject
from efficientml.finetune.lora import LoRAConfig
from efficientml.finetune.nf4 import NF4Linear


@dataclass(frozen=True)
class QLoRAConfig(LoRAConfig):
    """LoRAConfig plus the base's storage: NF4 blocks of ``block`` weights, block scales quantized to
    int8 in blocks of ``scale_block`` (``double_quant``)."""

    kind = "qlora"
    block: int = 64
    double_quant: bool = True
    scale_block: int = 256

    def validate(self) -> None:
        super().validate()
        if self.block < 2 or self.block % 2:
            raise ConfigError(f"NF4 block must be an even integer ≥ 2, got {self.block!r}")
        if self.scale_block < 1:
            raise ConfigError(f"scale_block must be a positive integer, got {self.scale_block!r}")


@register_transform(QLoRAConfig)
def apply_qlora(model: nn.Module, config: QLoRAConfig, *, calib=None, filter: LayerFilter) -> TransformResult:
    """LoRA / DoRA adapters over NF4 bases (calib is not used)."""
    def nf4(lin: nn.Linear) -> NF4Linear:
        return NF4Linear.from_linear(lin, block=config.block, double_quant=config.double_quant,
                                     scale_block=config.scale_block).to(lin.weight.device)

    result = inject(model, config, filter, nf4)
    release_memory()  # hand the dropped float weights back to the OS
    base_bytes = sum(m.base_layer.nbytes() for m in model.modules() if hasattr(m, "base_layer"))
    n = sum(v["in"] * v["out"] for v in result.layers.values())
    result.report["base_bytes"] = base_bytes
    result.report["bits_per_weight"] = 8 * base_bytes / max(1, n)
    return result
