"""The LLM fine-tuning methods besides LoRA/QLoRA by the name the CLI and the recipe use, and how a
method's config is built from the CLI's knobs (every knob has the config's own default)."""

from __future__ import annotations

from typing import Any

from efficientml.core.config import Config
from efficientml.core.errors import ConfigError
from efficientml.finetune.bitfit import BitFitConfig
from efficientml.finetune.bottleneck import AdapterConfig
from efficientml.finetune.ia3 import IA3Config
from efficientml.finetune.prompt import PrefixTuningConfig, PromptTuningConfig

PEFT_METHODS: dict[str, type[Config]] = {"bitfit": BitFitConfig, "adapter": AdapterConfig, "prompt": PromptTuningConfig,
                                         "prefix": PrefixTuningConfig, "ia3": IA3Config}


def method_config(method: str, targets: tuple[str, ...] | None = None, add_bias: bool = False,
                  adapter_style: str = "houlsby", reduction_factor: int = 16, virtual_tokens: int = 20,
                  prefix_projection: bool = False, seed: int = 0) -> Config:
    """The config of ``method`` (one of :data:`PEFT_METHODS`) from the CLI's options."""
    if method not in PEFT_METHODS:
        raise ConfigError(f"method must be one of {', '.join(PEFT_METHODS)}, got {method!r}")
    kw: dict[str, Any] = {}
    if method == "bitfit":
        kw = {"add_bias": add_bias, **({"target_modules": targets} if targets else {})}
    elif method == "adapter":
        kw = {"style": adapter_style, "reduction_factor": reduction_factor, "seed": seed}
    elif method == "prompt":
        kw = {"num_virtual_tokens": virtual_tokens, "seed": seed}
    elif method == "prefix":
        kw = {"num_virtual_tokens": virtual_tokens, "projection": prefix_projection, "seed": seed}
    elif targets:  # ia3: the feed-forward ones among the targets scale their input
        kw = {"target_modules": targets,
              "feedforward_modules": tuple(t for t in targets if t in IA3Config().feedforward_modules)}
    return PEFT_METHODS[method](**kw)
