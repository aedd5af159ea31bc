"""The once-for-all supernet of an :class:`~efficientml.nas.space.MBSpace` at one width multiplier:
every block slot holds its largest setting (largest kernel, largest expand ratio) in elastic layers
(:mod:`efficientml.nas.dynamic`); :meth:`OFANet.set_active` picks a subnet (elastic kernel, elastic
depth — the first ``d`` blocks of a stage —, elastic width — the first hidden channels of a block, after
:meth:`OFANet.sort_channels` put the most important first); the input resolution is the data's (see
:func:`resize`). :meth:`OFANet.extract` copies the active subnet's weights into a plain
:class:`~efficientml.nas.subnet.MBNet` that computes the same function (tested).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.errors import ConfigError
from efficientml.models.mobilenetv2 import ConvBNReLU
from efficientml.nas.dynamic import DynamicBN, DynamicDepthwise, DynamicPointwise
from efficientml.nas.space import Arch, MBSpace
from efficientml.models.mbnet import MBNet
from efficientml.nas.subnet import build_subnet


def resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Images (B, C, H, W) at ``resolution``² (bilinear, no antialias); unchanged when already there."""
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)


class DynamicMBBlock(nn.Module):
    """Inverted bottleneck with elastic expand ratio and depthwise kernel."""

    def __init__(self, c_in: int, c_out: int, stride: int, kernels: tuple[int, ...], max_expand: float):
        super().__init__()
        self.c_in, self.c_out, self.stride = c_in, c_out, stride
        self.max_hidden = int(round(c_in * max_expand))
        self.expand, self.expand_bn = DynamicPointwise(c_in, self.max_hidden), DynamicBN(self.max_hidden)
        self.dw, self.dw_bn = DynamicDepthwise(self.max_hidden, kernels, stride), DynamicBN(self.max_hidden)
        self.project, self.project_bn = DynamicPointwise(self.max_hidden, c_out), DynamicBN(c_out)
        self.residual = stride == 1 and c_in == c_out
        self.kernel, self.hidden = max(kernels), self.max_hidden

    def set_active(self, kernel: int, expand: float) -> None:
        self.kernel, self.hidden = kernel, int(round(self.c_in * expand))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.expand_bn(self.expand(x, self.hidden)))
        y = F.relu6(self.dw_bn(self.dw(y, self.kernel)))
        y = self.project_bn(self.project(y, self.c_out))
        return x + y if self.residual else y

    @torch.no_grad()
    def sort_channels(self) -> None:
        """Reorder the hidden channels by importance (L1 norm of the projection's input weights), most
        important first; the full block's function is unchanged."""
        order = self.project.weight.abs().sum(dim=(0, 2, 3)).argsort(descending=True)
        self.expand.weight.copy_(self.expand.weight[order])
        self.dw.weight.copy_(self.dw.weight[order])
        self.project.weight.copy_(self.project.weight[:, order])
        for dbn in (self.expand_bn, self.dw_bn):
            bn = dbn.bn
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                t.copy_(t[order])


class OFANet(nn.Module):
    """The supernet (module docstring); starts with the largest subnet active."""

    def __init__(self, space: MBSpace, width: float | None = None):
        super().__init__()
        self.space = space
        self.width = max(space.widths) if width is None else width
        if self.width not in space.widths:
            raise ConfigError(f"width {self.width} is not one of the space's widths {space.widths}")
        if min(space.expands) < 1 or (1 in space.expands):
            raise ConfigError("the supernet needs expand ratios > 1 (every block has its 1×1 expansion conv)")
        full = space.largest(width=self.width)
        c_stem = space.stem_channels(self.width)
        self.stem = ConvBNReLU(space.in_channels, c_stem, 3, space.stem_stride)
        self.stages = nn.ModuleList()
        c = c_stem
        for (_, dmax, s), c_out in zip(space.stages, space.stage_channels(self.width)):
            self.stages.append(nn.ModuleList(
                DynamicMBBlock(c if i == 0 else c_out, c_out, s if i == 0 else 1, space.kernels, max(space.expands))
                for i in range(dmax)))
            c = c_out
        head = space.head_channels(self.width)
        self.head = ConvBNReLU(c, head, 1)
        self.classifier = nn.Sequential(nn.Dropout(space.dropout), nn.Linear(head, space.num_classes))
        nn.init.normal_(self.classifier[1].weight, 0, 0.01)
        nn.init.zeros_(self.classifier[1].bias)
        self.active = full
        self.set_active(full)

    def set_active(self, arch: Arch) -> None:
        self.space.check(arch)
        if arch.width != self.width:
            raise ConfigError(f"the architecture's width {arch.width} is not this supernet's {self.width}")
        self.active = self.space.canonical(arch)
        slot = 0
        for stage in self.stages:
            for i, block in enumerate(stage):
                block.set_active(arch.kernels[slot + i], arch.expands[slot + i])
            slot += len(stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage, d in zip(self.stages, self.active.depths):
            for block in stage[:d]:
                x = block(x)
        x = self.head(x).mean(dim=(2, 3))
        return self.classifier(x)

    def sort_channels(self) -> None:
        for stage in self.stages:
            for block in stage:
                block.sort_channels()

    def active_blocks(self) -> list[DynamicMBBlock]:
        return [b for stage, d in zip(self.stages, self.active.depths) for b in stage[:d]]

    @torch.no_grad()
    def extract(self, arch: Arch | None = None) -> MBNet:
        """A plain :class:`MBNet` of ``arch`` (default: the active one) holding the supernet's weights."""
        if arch is not None:
            self.set_active(arch)
        net = build_subnet(self.space, self.active)
        feats = list(net.features)
        feats[0].load_state_dict(self.stem.state_dict())
        feats[-1].load_state_dict(self.head.state_dict())
        net.classifier.load_state_dict(self.classifier.state_dict())
        for block, ir in zip(self.active_blocks(), feats[1:-1]):
            h = block.hidden
            (e_conv, e_bn, _), (d_conv, d_bn, _), p_conv, p_bn = ir.conv[0], ir.conv[1], ir.conv[2], ir.conv[3]
            e_conv.weight.copy_(block.expand.active_weight(block.c_in, h))
            d_conv.weight.copy_(block.dw.active_weight(h, block.kernel))
            p_conv.weight.copy_(block.project.active_weight(h, block.c_out))
            for src, dst in ((block.expand_bn, e_bn), (block.dw_bn, d_bn), (block.project_bn, p_bn)):
                _copy_bn(src.bn, dst, dst.num_features)
        return net.train(self.training)


def _copy_bn(src: nn.BatchNorm2d, dst: nn.BatchNorm2d, c: int) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(dst, name).copy_(getattr(src, name)[:c])
    dst.num_batches_tracked.copy_(src.num_batches_tracked)
    dst.eps, dst.momentum = src.eps, src.momentum


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches, resolution: int | None = None) -> nn.Module:
    """Reset every BatchNorm's running statistics and re-estimate them as the exact average over
    ``batches`` (an iterable of images or (images, labels)), the rest of the model in eval mode; OFA's
    step after picking a subnet, whose statistics differ from the supernet's mixture. Returns ``model``
    in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    for b in batches:
        x = b[0] if isinstance(b, (tuple, list)) else b
        model(resize(x, resolution) if resolution else x)
    for bn, mom in zip(bns, saved):
        bn.momentum = mom
    return model.eval()
