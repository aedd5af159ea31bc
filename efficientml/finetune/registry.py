"""The fine-tuning configs by ``kind`` (what ``method_config.json`` names), for loading a saved state."""

from __future__ import annotations

from efficientml.finetune.bitfit import BitFitConfig
from efficientml.finetune.bottleneck import AdapterConfig
from efficientml.finetune.ia3 import IA3Config
from efficientml.finetune.lora import LoRAConfig
from efficientml.finetune.prompt import PrefixTuningConfig, PromptTuningConfig
from efficientml.finetune.qlora import QLoRAConfig
from efficientml.finetune.tinytl import TinyTLConfig

METHOD_CONFIGS = {c.kind: c for c in (LoRAConfig, QLoRAConfig, BitFitConfig, AdapterConfig, IA3Config,
                                      PromptTuningConfig, PrefixTuningConfig, TinyTLConfig)}
