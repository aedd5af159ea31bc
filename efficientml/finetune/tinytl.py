"""TinyTL (Cai et al. 2020): transfer a CNN with its weights frozen — train the biases, plus small
"lite residual" branches, and a new head — so training keeps almost no activations for backward.

    y = block(x) + up(conv1×1(relu(GN(groupconv3×3(pool(x))))))      pool: ÷``downsample`` resolution

The main path becomes activation-free (:mod:`efficientml.finetune.lean_ops`: frozen convs keep no
input, batch norm is a frozen affine with a trainable shift, ReLUs keep a 1-bit mask). The lite
residual's weights train, but it sees the input at 1/``downsample``² of the pixels, and its last 1×1
conv starts at zero, so the model starts as the base model. A block is any module whose class name is
in ``block_types`` (CIFAR/ImageNet ResNet blocks, MobileNetV2's inverted residual); the shapes come
from one probe forward at ``input_shape``.

    apply(model, TinyTLConfig(num_classes=10), inplace=True)
    apply(model, LastLayerConfig(num_classes=10), inplace=True)   # the linear-probe baseline
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.config import Config
from efficientml.core.errors import ConfigError
from efficientml.core.modules import set_module
from efficientml.core.transform import LayerFilter, TransformResult, register_transform
from efficientml.finetune.bitfit import head_name
from efficientml.finetune.inject import trainable_parameters
from efficientml.finetune.lean_ops import lean_activations, make_lean, mask_relu
from efficientml.finetune.targets import freeze

BLOCK_TYPES = ("BasicBlock", "Bottleneck", "InvertedResidual")


@dataclass(frozen=True)
class TinyTLConfig(Config):
    """``num_classes``: a new trainable head of that many classes (None: train the existing head).
    ``lite_residual=False``: biases (and head) only, on the activation-free main path."""

    kind = "tinytl"
    num_classes: int | None = None
    lite_residual: bool = True
    downsample: int = 2
    group_size: int = 8
    expand: int = 1
    block_types: tuple[str, ...] = BLOCK_TYPES
    input_shape: tuple[int, ...] = (3, 32, 32)
    seed: int = 0

    def validate(self) -> None:
        _check_classes(self.num_classes)
        for name in ("downsample", "group_size", "expand"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if len(self.input_shape) != 3:
            raise ConfigError(f"input_shape must be (channels, height, width), got {self.input_shape!r}")


@dataclass(frozen=True)
class LastLayerConfig(Config):
    """Train only the classifier head (a new one of ``num_classes`` if given): the linear probe."""

    kind = "last_layer"
    num_classes: int | None = None
    seed: int = 0

    def validate(self) -> None:
        _check_classes(self.num_classes)


def _check_classes(n: int | None) -> None:
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ConfigError(f"num_classes must be a positive integer or None, got {n!r}")


class _PoolFn(torch.autograd.Function):
    """Average pooling by r that keeps only the input's shape for backward (grad spreads evenly)."""

    @staticmethod
    def forward(ctx, x, r):
        ctx.shape, ctx.r = x.shape, r
        return F.avg_pool2d(x, r)

    @staticmethod
    def backward(ctx, grad):
        r, (_, _, H, W) = ctx.r, ctx.shape
        gx = grad.new_zeros(ctx.shape)
        up = grad.repeat_interleave(r, 2).repeat_interleave(r, 3) / (r * r)  # (B, C, H//r·r, W//r·r)
        gx[:, :, :up.shape[2], :up.shape[3]] = up
        return gx, None


class LiteResidual(nn.Module):
    """pool ÷r → 3×3 group conv (stride = the block's) → GroupNorm → ReLU → 1×1 conv (zero) → upsample."""

    def __init__(self, cin: int, cout: int, stride: int, r: int, group_size: int, expand: int) -> None:
        super().__init__()
        groups = max(1, cin // group_size)
        while cin % groups:
            groups -= 1
        mid = cin * expand
        self.r = r
        self.conv = nn.Conv2d(cin, mid, 3, stride, 1, groups=groups, bias=False)
        self.norm = nn.GroupNorm(groups, mid)
        self.project = nn.Conv2d(mid, cout, 1, bias=False)
        nn.init.zeros_(self.project.weight)  # the branch adds nothing until it trains

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        p = _PoolFn.apply(x, self.r) if self.r > 1 and min(x.shape[2:]) >= self.r else x  # (B, C, H/r, W/r)
        h = self.project(mask_relu(self.norm(self.conv(p))))
        return F.interpolate(h, size=size, mode="bilinear", align_corners=False)  # (B, C', H', W')


class LiteResidualBlock(nn.Module):
    """A frozen block (its functional ReLUs keep masks) plus a lite residual on the same input."""

    def __init__(self, block: nn.Module, lite: LiteResidual | None) -> None:
        super().__init__()
        self.block, self.lite_residual = block, lite

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with lean_activations():
            y = self.block(x)
        return y if self.lite_residual is None else y + self.lite_residual(x, y.shape[2:])


def new_head(model: nn.Module, num_classes: int, seed: int = 0) -> str:
    """Replace the classifier (the last nn.Linear) by a fresh one with ``num_classes`` outputs."""
    name = head_name(model)
    old = model.get_submodule(name)
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init, seeded, the caller's RNG untouched
        torch.manual_seed(seed)
        head = nn.Linear(old.in_features, num_classes, bias=old.bias is not None, device=old.weight.device,
                         dtype=old.weight.dtype)
    set_module(model, name, head)
    return name


def _block_shapes(model: nn.Module, config: TinyTLConfig) -> dict[str, tuple[torch.Size, torch.Size]]:
    blocks = {n: m for n, m in model.named_modules() if type(m).__name__ in config.block_types}
    top = {n: m for n, m in blocks.items() if not any(n.startswith(o + ".") for o in blocks)}
    shapes: dict[str, tuple[torch.Size, torch.Size]] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: shapes.__setitem__(n, (a[0].shape, out.shape)))
             for n, m in top.items()]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            p = next(model.parameters())
            model(torch.zeros(1, *config.input_shape, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return shapes


@register_transform(TinyTLConfig)
def apply_tinytl(model: nn.Module, config: TinyTLConfig, *, calib=None, filter: LayerFilter) -> TransformResult:
    """Frozen weights, trainable biases, lite residuals and head (calib and filter are not used)."""
    shapes = _block_shapes(model, config)
    if config.lite_residual and not shapes:
        raise ConfigError(f"TinyTL found no residual block to attach a lite residual to (looked for module types "
                          f"{config.block_types}); pass block_types naming the model's blocks, or lite_residual=False")
    head = new_head(model, config.num_classes, config.seed) if config.num_classes else head_name(model)
    freeze(model)
    swaps = make_lean(model)
    for n, p in model.named_parameters():  # biases and batch-norm shifts train (TinyTL's "bias" part)
        if n.endswith(".bias"):
            p.requires_grad_(True)
    layers = {}
    with torch.random.fork_rng(devices=[]):  # the lite residuals' initial weights, seeded
        torch.manual_seed(config.seed)
        for n, (si, so) in shapes.items():
            stride = max(1, si[2] // so[2])
            lite = LiteResidual(si[1], so[1], stride, config.downsample, config.group_size, config.expand).to(
                next(model.parameters()).device) if config.lite_residual else None
            set_module(model, n, LiteResidualBlock(model.get_submodule(n), lite))
            layers[n] = {"in": list(si[1:]), "out": list(so[1:]), "stride": stride}
    for p in model.get_submodule(head).parameters():
        p.requires_grad_(True)
    return TransformResult(model, config, "real", layers,
                           {"trainable": trainable_parameters(model), "lean": swaps, "head": head})


@register_transform(LastLayerConfig)
def apply_last_layer(model: nn.Module, config: LastLayerConfig, *, calib=None, filter: LayerFilter) -> TransformResult:
    head = new_head(model, config.num_classes, config.seed) if config.num_classes else head_name(model)
    freeze(model)
    for p in model.get_submodule(head).parameters():
        p.requires_grad_(True)
    return TransformResult(model, config, "real", {head: {"trainable": True}},
                           {"trainable": trainable_parameters(model)})


def freeze_batchnorm_stats(model: nn.Module) -> nn.Module:
    """Batch-norm layers at their running statistics (eval) while the rest trains: the transfer setting
    for a frozen backbone (last-layer, BitFit)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model
