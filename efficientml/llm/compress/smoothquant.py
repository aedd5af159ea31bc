"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights with per-channel scales
``s_j = max|X_j|^α / max|W_j|^(1−α)`` (folded into the preceding RMSNorm), then quantize to W8A8:
int8 per-output-channel weights and int8 activations — per-token dynamic scales or one calibrated
per-tensor static scale per linear.

Smoothing uses the scaling groups whose predecessor is a norm (q/k/v, gate/up), as the reference
implementation does for Llama; ``smooth_linear_prev=True`` also smooths linear→linear groups (up→down).
A static scale is the calibrated max |x| of the *smoothed* input, which follows exactly from the
per-channel maxima: max_j(max|X_j| / s_j).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from efficientml.core.config import Config, check_choice, check_range
from efficientml.llm.compress.awq import apply_scale
from efficientml.llm.compress.mappings import scaling_groups, usable


@dataclass(frozen=True)
class SmoothQuantConfig(Config):
    kind = "smoothquant"
    alpha: float = 0.5
    smooth: bool = True
    act: str = "dynamic"            # "dynamic" (per token) | "static" (per tensor, calibrated)
    smooth_linear_prev: bool = False
    backend: str = "auto"           # W8A8 matmul: "auto" (int_mm on CUDA) | "int_mm" | "float"

    def validate(self) -> None:
        check_range("alpha", self.alpha, 0.0, 1.0)
        check_choice("act", self.act, ("dynamic", "static"))
        check_choice("backend", self.backend, ("auto", "int_mm", "float"))


@torch.no_grad()
def smoothing_scale(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0)  # (in,) over all group linears
    return (act_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)


def smoothquant_processor(model, cfg: SmoothQuantConfig, pack: bool = True, log: dict | None = None):
    from efficientml.core.modules import set_module
    from efficientml.llm.kernels.qlinear import W8A8Linear

    groups = scaling_groups(model)

    @torch.no_grad()
    def process(data):
        block = data.block
        amax = {g.linears[0]: torch.zeros(block.get_submodule(g.linears[0]).in_features, device=data.device)
                for g in groups}

        def stat(k):
            def fn(x):
                torch.maximum(amax[k], x.abs().amax(0), out=amax[k])
            return fn

        fp_out = data.run({k: stat(k) for k in amax})
        for g in groups:
            k = g.linears[0]
            if cfg.smooth and usable(g, block) and (g.prev_is_norm or cfg.smooth_linear_prev):
                s = smoothing_scale(amax[k], [block.get_submodule(n).weight for n in g.linears], cfg.alpha)
                apply_scale(block, g, s)
                amax[k] = amax[k] / s
        for g in groups:
            k = g.linears[0]
            for name in g.linears:
                lin = block.get_submodule(name)
                backend = cfg.backend if pack else "float"  # pack=False: the float emulation
                set_module(block, name, W8A8Linear.from_linear(lin, cfg.act, float(amax[k].max()) / 127.0, backend))
        return fp_out  # smoothing is exact, so these are the smoothed model's fp outputs

    return process
