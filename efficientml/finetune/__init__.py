"""Efficient fine-tuning: LoRA, DoRA, QLoRA (NF4 base, 8-bit optimizer states), PEFT-layout adapters,
and the SFT trainer. Each method is a config applied by ``efficientml.apply``. Alignment and
deployment (imported from their modules): DPO (``dpo``, ``reference``, ``preference``), the reward
model (``reward``), BitDelta (``bitdelta``, ``bitdelta_serve``), merging into W4 (``merge_quant``)."""

from efficientml.finetune.inject import (adapter_state_dict, adapters, load_adapter_state_dict, merge,
                                         merge_and_unload, trainable_parameters, unmerge)
from efficientml.finetune.lora import LoRAConfig, LoRALinear
from efficientml.finetune.nf4 import NF4Linear
from efficientml.finetune.qlora import QLoRAConfig

__all__ = ["LoRAConfig", "LoRALinear", "NF4Linear", "QLoRAConfig", "adapter_state_dict", "adapters",
           "load_adapter_state_dict", "merge", "merge_and_unload", "trainable_parameters", "unmerge"]
