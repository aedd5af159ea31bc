"""Efficient fine-tuning: LoRA, DoRA, QLoRA (NF4 base, 8-bit optimizer states), PEFT-layout adapters,
BitFit, bottleneck adapters, prompt/prefix tuning, IA3, TinyTL, and the SFT trainer. Each method is a
config applied by ``efficientml.apply``. Alignment and deployment (imported from their modules): DPO
(``dpo``, ``reference``, ``preference``), the reward model (``reward``), BitDelta (``bitdelta``,
``bitdelta_serve``), merging into W4 (``merge_quant``, ``w4base``)."""

from efficientml.finetune.inject import (adapter_state_dict, adapters, load_adapter_state_dict, merge,
                                         merge_and_unload, trainable_parameters, unmerge)
from efficientml.finetune.lora import LoRAConfig, LoRALinear
from efficientml.finetune.nf4 import NF4Linear
from efficientml.finetune.qlora import QLoRAConfig
from efficientml.finetune.bitfit import BitFitConfig
from efficientml.finetune.bottleneck import AdapterConfig
from efficientml.finetune.ia3 import IA3Config, merge_ia3, unmerge_ia3
from efficientml.finetune.memory import training_memory
from efficientml.finetune.method_io import load_trainable, save_trainable, trainable_state_dict
from efficientml.finetune.peft_ia3 import load_ia3_adapter, save_ia3_adapter
from efficientml.finetune.peft_prompt import load_prompt_adapter, save_prompt_adapter
from efficientml.finetune.prompt import PrefixTuningConfig, PromptTuningConfig
from efficientml.finetune.tinytl import LastLayerConfig, TinyTLConfig

__all__ = ["AdapterConfig", "BitFitConfig", "IA3Config", "LastLayerConfig", "PrefixTuningConfig",
           "PromptTuningConfig", "TinyTLConfig", "load_ia3_adapter", "load_prompt_adapter", "load_trainable",
           "merge_ia3", "save_ia3_adapter", "save_prompt_adapter", "save_trainable", "trainable_state_dict", "training_memory", "unmerge_ia3"]
__all__ += ["LoRAConfig", "LoRALinear", "NF4Linear", "QLoRAConfig", "adapter_state_dict", "adapters",
           "load_adapter_state_dict", "merge", "merge_and_unload", "trainable_parameters", "unmerge"]
