"""BitFit: train the biases only (Ben Zaken et al. 2022), everything else frozen.

    result = efficientml.apply(model, BitFitConfig(), inplace=True)

What a bias is here: the ``bias`` of every Linear / Conv / normalization layer (a BatchNorm's or
LayerNorm's ``bias`` is its shift β). ``patterns`` (globs over dotted parameter names, e.g.
"*.self_attn.*") narrow it; ``apply``'s ``filter`` does not apply (BitFit selects tensors, not layers).

LLaMA-family models (SmolLM2, Llama, Mistral …) have no biases at all: their linears are bias-free
and RMSNorm has only a scale. BitFit then has nothing to train, and that is an error saying so,
unless ``add_bias=True``: every selected linear (``target_modules``, by default the decoder-block
projections) gets a zero bias, which changes no output until it trains and is saved with the other
trainable tensors. Qwen2's q/k/v biases are real biases and train without ``add_bias``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.nn as nn

from efficientml.core.config import Config
from efficientml.core.errors import ConfigError
from efficientml.core.transform import LayerFilter, TransformResult, register_transform
from efficientml.finetune.inject import trainable_parameters
from efficientml.finetune.lora import BLOCK_LINEARS
from efficientml.finetune.targets import freeze, select_linears


@dataclass(frozen=True)
class BitFitConfig(Config):
    """``add_bias``: give the ``target_modules`` linears that lack one a zero bias (bias-free models).
    ``patterns``: which bias tensors train (globs over parameter names; () = all).
    ``train_head``: also train the classifier (the last nn.Linear), as BitFit does for a new task."""

    kind = "bitfit"
    add_bias: bool = False
    target_modules: tuple[str, ...] = BLOCK_LINEARS
    patterns: tuple[str, ...] = ()
    train_head: bool = False

    def validate(self) -> None:
        if isinstance(self.patterns, str) or isinstance(self.target_modules, str):
            raise ConfigError("patterns and target_modules must be tuples of names or globs, not one string")


def _add_zero_biases(model: nn.Module, config: BitFitConfig, filter: LayerFilter) -> list[str]:
    added = []
    for n in select_linears(model, config.target_modules, filter, "BitFit"):
        lin = model.get_submodule(n)
        if lin.bias is None:
            w = lin.weight
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, device=w.device, dtype=w.dtype))
            added.append(n)
    return added


def head_name(model: nn.Module) -> str:
    """The classifier: the last ``nn.Linear`` registered in the model."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError("the model has no nn.Linear classifier head to train")
    return names[-1]


@register_transform(BitFitConfig)
def apply_bitfit(model: nn.Module, config: BitFitConfig, *, calib=None, filter: LayerFilter) -> TransformResult:
    """Freeze everything, then unfreeze the biases (calib is not used)."""
    added = _add_zero_biases(model, config, filter) if config.add_bias else []
    freeze(model)
    biases = [n for n, _ in model.named_parameters() if n == "bias" or n.endswith(".bias")]
    if config.patterns:
        biases = [n for n in biases if any(fnmatch.fnmatchcase(n, p) for p in config.patterns)]
    if not biases:
        why = ("none of its biases match patterns " + repr(config.patterns)) if config.patterns else \
            "it has no bias parameters (LLaMA-style linears and RMSNorm are bias-free)"
        raise ConfigError(f"BitFit has nothing to train: {why}; use BitFitConfig(add_bias=True) (CLI: --add-bias) "
                          "to give the target linears zero biases that train")
    params = dict(model.named_parameters())
    for n in biases:
        params[n].requires_grad_(True)
    if config.train_head:
        for p in model.get_submodule(head_name(model)).parameters():
            p.requires_grad_(True)
    layers = {n.rsplit(".", 1)[0]: {"bias": params[n].numel(), "added": n.rsplit(".", 1)[0] in added}
              for n in biases}
    return TransformResult(model, config, "real", layers,
                           {"trainable": trainable_parameters(model), "added_biases": len(added)})
