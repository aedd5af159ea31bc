"""A network of the space as a plain zoo model: :class:`efficientml.models.mbnet.MBNet` (the zoo's
MobileNetV2 modules, ``ConvBNReLU`` and ``InvertedResidual`` with its depthwise kernel size, named as
torchvision names them), so profile, prune, quantize, the int8 engine and every CLI command take it
as is; its checkpoint names ``model: mbnet`` with :func:`subnet_kwargs` as ``model_kwargs``."""

from __future__ import annotations

from typing import Any

from efficientml.models.mbnet import MBNet
from efficientml.nas.space import Arch, MBSpace


def subnet_kwargs(space: MBSpace, arch: Arch) -> dict[str, Any]:
    """The ``mbnet`` builder's keyword arguments for ``arch`` (JSON-serializable)."""
    space.check(arch)
    blocks = [[c_out, stride, float(expand), kernel] for _, _, c_out, stride, expand, kernel in space.blocks(arch)]
    return {"blocks": blocks, "stem": space.stem_channels(arch.width), "head": space.head_channels(arch.width),
            "num_classes": space.num_classes, "in_channels": space.in_channels, "stem_stride": space.stem_stride,
            "dropout": space.dropout}


def build_subnet(space: MBSpace, arch: Arch) -> MBNet:
    """A freshly initialized plain model of ``arch`` (torchvision's initialization)."""
    net = MBNet(**subnet_kwargs(space, arch))
    net.arch = space.canonical(arch)
    net.resolution = arch.resolution
    return net
