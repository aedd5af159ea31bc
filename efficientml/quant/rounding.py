"""Weight rounding for post-training quantization: round-to-nearest (RTN) and stochastic rounding,
applied to every Conv2d/Linear with symmetric per-channel scales (see :mod:`adaround` for learned
rounding)."""

from __future__ import annotations

import torch
import torch.nn as nn

from efficientml.core.modules import named_layers
from efficientml.quant.grid import GridSpec, fake_quantize


def weight_spec(bits: int, per_channel: bool = True, rounding: str = "nearest") -> GridSpec:
    return GridSpec(bits=bits, symmetric=True, granularity="channel" if per_channel else "tensor",
                           narrow=True, rounding=rounding)


@torch.no_grad()
def round_weights(model: nn.Module, bits: int, rounding: str = "nearest", per_channel: bool = True,
                  skip: tuple[str, ...] = (), seed: int = 0) -> list[str]:
    """Replace each Conv2d/Linear weight by its quantized value (in place); returns the layers done."""
    g = torch.Generator().manual_seed(seed)
    spec = weight_spec(bits, per_channel, rounding)
    done = []
    for name, layer in named_layers(model, (nn.Conv2d, nn.Linear)):
        if name in skip:
            continue
        layer.weight.copy_(fake_quantize(layer.weight, spec, generator=g))
        done.append(name)
    return done
