"""LoRA on a W4 base (the integer grid of the project's W4 checkpoints), and merging it back onto the
*same* grid with calibration.

``W4LoRAConfig`` puts every targeted linear's weight on the 4-bit grid (round to nearest; symmetric,
groups of 32 by default: GGUF Q4_0), stored packed in a :class:`QuantLinear`, and trains LoRA on top
(the weight is dequantized on the fly in forward and backward, as the NF4 base is).

Merging onto the base's grid (:func:`merge_on_base_grid`): the base weight is exactly on its grid, so
keeping its scales leaves only the adapter's update to round. Rounding alone (``naive``) loses most of
it — an update far smaller than a grid step rounds back to the base codes (peft #2321). The calibrated
merge runs GPTQ on the merged weight with the base's scales fixed, from the Hessian of each layer's
inputs in the adapted model on calibration text, so the update survives in the layer outputs::

    apply(model, W4LoRAConfig(rank=16), inplace=True); train_sft(model, ...)
    res = merge_on_base_grid(model, calib)          # MergeResult(calibrated, naive, report)
    save_merged(res.calibrated, tok, "out/merged-w4")   # same W4 format as the base: Q4_0 in GGUF
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.errors import ConfigError
from efficientml.core.modules import set_module
from efficientml.core.transform import LayerFilter, TransformResult, register_transform
from efficientml.finetune.inject import adapters, inject
from efficientml.finetune.lora import LoRAConfig
from efficientml.finetune.merge_quant import MergeResult
from efficientml.llm.compress.gptq import gptq_quantize
from efficientml.llm.compress.rtn import quantize_weight
from efficientml.llm.compress.stats import HessianAccumulator
from efficientml.llm.kernels.qlinear import QuantLinear
from efficientml.quant.grid import GridSpec, QTensor, weight_grid


@dataclass(frozen=True)
class W4LoRAConfig(LoRAConfig):
    """LoRAConfig plus the base's grid: ``w_bits`` (4), ``group_size`` (32), ``symmetric``."""

    kind = "w4lora"
    w_bits: int = 4
    group_size: int | None = 32
    symmetric: bool = True

    def validate(self) -> None:
        super().validate()
        self.spec  # noqa: B018 — validates bits and group size

    @property
    def spec(self) -> GridSpec:
        return weight_grid(self.w_bits, self.group_size, self.symmetric)


class W4Linear(nn.Module):
    """A frozen packed :class:`QuantLinear` base whose weight is dequantized on the fly in forward and
    in backward (only the input's gradient is needed; nothing float outlives the matmul)."""

    def __init__(self, q: QuantLinear) -> None:
        super().__init__()
        self.q = q
        self.in_features, self.out_features = q.in_features, q.out_features
        self.bias = q.bias

    @classmethod
    def from_linear(cls, lin: nn.Linear, spec: GridSpec, name: str = "layer") -> "W4Linear":
        qw = quantize_weight(lin.weight.detach().float(), spec, name=name)
        return cls(QuantLinear.from_quantized(qw, None if lin.bias is None else lin.bias.detach()))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.q.dequantize(dtype)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero), each (out, G): the grid the base weight lies on."""
        return self.q.weight_scale.float(), self.q.zeros()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _W4Matmul.apply(x, self)
        return y + self.bias.to(y.dtype) if self.bias is not None else y


class _W4Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: W4Linear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g @ ctx.layer.dequantize(g.dtype), None


@register_transform(W4LoRAConfig)
def apply_w4lora(model: nn.Module, config: W4LoRAConfig, *, calib=None, filter: LayerFilter) -> TransformResult:
    """LoRA / DoRA adapters over W4 bases (round to nearest on ``config.spec``; calib is not used)."""
    return inject(model, config, filter, lambda lin: W4Linear.from_linear(lin, config.spec))


@torch.no_grad()
def _input_hessians(model: nn.Module, names: list[str], calib: torch.Tensor, batch_size: int) -> dict:
    """H = 2/N Σ x xᵀ of each named layer's inputs in ``model`` (base + adapter) over ``calib``."""
    acc, hooks = {}, []
    mods = dict(model.named_modules())
    for n in names:
        acc[n] = HessianAccumulator(mods[n].in_features, calib.device)
        hooks.append(mods[n].register_forward_pre_hook(lambda m, a, n=n: acc[n].add(a[0].reshape(-1, a[0].shape[-1]))))
    try:
        for s in range(0, calib.shape[0], batch_size):
            model(calib[s:s + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return {n: a.value(inplace=True) for n, a in acc.items()}


def _blocks(names: list[str]) -> list[list[str]]:
    """Layer names grouped by decoder block (``model.layers.<i>.``), in order."""
    groups: dict[str, list[str]] = {}
    for n in names:
        key = n.split(".self_attn.")[0].split(".mlp.")[0]
        groups.setdefault(key, []).append(n)
    return list(groups.values())


@torch.no_grad()
def merge_on_base_grid(model: nn.Module, calib: torch.Tensor, damp: float = 0.01, act_order: bool = True,
                       sequential: bool = False, batch_size: int = 8) -> MergeResult:
    """Merge the adapters of a :class:`W4LoRAConfig` model onto their bases' grids: GPTQ with the
    base's scales (``calibrated``) and round to nearest with them (``naive``). ``model`` is unchanged.

    ``act_order``: GPTQ takes the columns by decreasing Hessian diagonal (the groups keep their scales).
    ``sequential``: block by block, each block's input Hessians taken from the model whose earlier
    blocks are already merged and rounded, so a block also absorbs the error of those before it (one
    full pass over ``calib`` per block: slow on a CPU); by default every Hessian comes from the adapted
    model in one pass."""
    layers = [(n, m) for n, m in adapters(model) if isinstance(m.base_layer, W4Linear)]
    if not layers or len(layers) != len(adapters(model)):
        raise ConfigError("merge_on_base_grid needs a model whose adapters all sit on W4 bases (apply a "
                          "W4LoRAConfig); for an NF4 (QLoRA) or float base use merge_into_quantized")
    model.eval()
    calibrated, naive = copy.deepcopy(model), copy.deepcopy(model)
    mods, moved = dict(layers), {"calibrated": 0, "naive": 0}
    groups = _blocks([n for n, _ in layers]) if sequential else [[n for n, _ in layers]]
    for group in groups:
        hessians = _input_hessians(calibrated, group, calib, batch_size)
        for n in group:
            m = mods[n]
            base: W4Linear = m.base_layer
            spec, (scale, zero) = base.q.spec, base.qparams()
            w = base.dequantize() + m.delta_weight().float()  # (out, in) base + s·BA, what the adapter computes
            cal = gptq_quantize(w, hessians.pop(n), spec, damp, act_order=act_order, qparams=(scale, zero), name=n,
                                overwrite_h=True)
            codes = torch.round(w.view(scale.shape[0], scale.shape[1], -1) / scale[..., None] + zero[..., None].float())
            nai = QTensor(codes.clamp_(0, spec.code_max).to(torch.uint8).view_as(w), scale, zero, spec)
            for model_, qt, key in ((calibrated, cal, "calibrated"), (naive, nai, "naive")):
                moved[key] += int((qt.codes != base.q.codes()).sum())
                set_module(model_, n, QuantLinear.from_quantized(qt, None if base.bias is None else base.bias.detach()))
    n_w = sum(m.in_features * m.out_features for _, m in layers)
    report = {"layers": len(layers), "calib_shape": list(calib.shape), "damp": damp, "act_order": act_order,
              "sequential": sequential, "codes_changed_fraction": {k: v / n_w for k, v in moved.items()}}
    return MergeResult(calibrated, naive, report)
