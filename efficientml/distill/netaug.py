"""NetAug (Cai et al. 2022): train a tiny model inside wider ones that share its weights.

A tiny model under-fits rather than over-fits, so instead of regularising it NetAug *augments the network*:
:class:`AugmentedNet` is a supernet whose every conv/linear/BatchNorm is widened (``max(widths)``× the output
channels, the classifier's outputs excepted), with the tiny model as its first channels (weight sharing by
slicing, as in once-for-all's elastic width: a conv of the subnet at width w uses ``W[:round(w·c_out),
:c_in(w)]``). Each step the loss is

    L = CE(tiny(x), y) + α · CE(wide_w(x), y),   w drawn uniformly from ``widths``

so the shared tiny weights also get the gradients of a wider model that contains them. :meth:`extract` then
copies the width-1 slices into a plain copy of the tiny model (same class, same structure).

Supported: a model whose forward is a chain of its leaf modules (each runs once, in order, on the previous
one's output; ``torch.flatten`` before a linear allowed), the leaves being Conv2d (groups = 1), Linear,
BatchNorm1d/2d and parameter-free element- or channel-wise layers (activations, pooling, dropout, flatten):
the zoo's ``small_cnn``, ``mlp`` and VGG-style nets. The construction checks on ``example_input`` that the
supernet at width 1 computes the tiny model's forward, and says so when it does not.

BatchNorm running statistics belong to the tiny network: width 1 uses and updates them as the tiny model
would; wider subnets always normalise with their batch statistics and leave the buffers alone.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.errors import ConfigError
from efficientml.distill.hooks import find_module
from efficientml.train.config import TrainConfig
from efficientml.train.loop import fit

_PARAMETER_FREE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
                   nn.Tanh, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout,
                   nn.Flatten, nn.Identity)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class _Layer:
    name: str            # dotted name in the tiny model
    kind: str            # "conv" | "linear" | "bn" | "fn"
    c_out: int           # tiny output channels/features (bn: channels)
    widen: bool          # whether c_out grows with the width (False for the classifier)


def _scaled(c: int, width: float, widen: bool) -> int:
    return max(c, int(round(c * width))) if widen else c


def _trace(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """(name, leaf module) in the order the leaves ran in one eval-mode forward of ``x``."""
    order: list[tuple[str, nn.Module]] = []
    leaves = [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: order.append((n, mod))) for n, m in leaves]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    names = [n for n, _ in order]
    repeated = sorted({n for n in names if names.count(n) > 1})
    skipped = [n for n, m in leaves if n not in names and any(True for _ in m.parameters())]
    if repeated or skipped:
        raise ConfigError(f"{type(model).__name__} is not a plain chain of layers: modules {repeated} run more "
                          f"than once, {skipped} hold weights but did not run")
    return order


def _widened(name: str, m: nn.Module, c_in_wide: int, c_out_wide: int) -> nn.Module:
    """A fresh module like ``m`` with ``c_in_wide`` inputs and ``c_out_wide`` outputs."""
    if isinstance(m, nn.Conv2d):
        if m.groups != 1 or m.padding_mode != "zeros":
            raise ConfigError(f"conv {name!r}: NetAug widens plain convs (groups = 1, zero padding); got groups="
                              f"{m.groups}, padding_mode={m.padding_mode!r}")
        return nn.Conv2d(c_in_wide, c_out_wide, m.kernel_size, m.stride, m.padding, m.dilation,
                         bias=m.bias is not None)
    if isinstance(m, nn.Linear):
        return nn.Linear(c_in_wide, c_out_wide, bias=m.bias is not None)
    return type(m)(c_out_wide, eps=m.eps, momentum=m.momentum, affine=m.affine,
                   track_running_stats=m.track_running_stats)


class AugmentedNet(nn.Module):
    """The NetAug supernet of ``tiny`` (module docstring). ``forward(x, width=1.0)``: (B, …) → (B, classes)
    logits of the subnet at ``width`` (1 = the tiny model, up to ``max(widths)``). ``example_input`` (a batch
    ``tiny`` accepts) traces the layers; by default (2, C, 32, 32) with C the first conv's input channels."""

    def __init__(self, tiny: nn.Module, widths: Sequence[float] = (1.5, 2.0, 2.5, 3.0),
                 example_input: torch.Tensor | None = None):
        super().__init__()
        if not widths or any(not isinstance(w, (int, float)) or w < 1 for w in widths):
            raise ConfigError(f"widths must be width multipliers ≥ 1 of the tiny model, got {tuple(widths)!r}")
        self.widths = tuple(float(w) for w in widths)
        self.max_width = max(self.widths)
        device = next((p.device for p in tiny.parameters()), torch.device("cpu"))
        if example_input is None:
            convs = [m for m in tiny.modules() if isinstance(m, nn.Conv2d)]
            if not convs:
                raise ConfigError(f"{type(tiny).__name__} has no Conv2d to size a default input; pass "
                                  "example_input")
            example_input = torch.zeros(2, convs[0].in_channels, 32, 32, device=device)
        self._template = (copy.deepcopy(tiny),)          # a tuple: extract()'s blueprint, not a submodule
        self.layers: list[_Layer] = []
        self.wide = nn.ModuleDict()                     # "conv0" style keys: dots are not allowed in names
        self.fns = nn.ModuleDict()
        self._build(_trace(tiny, example_input))
        self.to(device)
        self._check(tiny, example_input)

    def _build(self, order: list[tuple[str, nn.Module]]) -> None:
        weighted = [i for i, (_, m) in enumerate(order) if isinstance(m, (nn.Conv2d, nn.Linear))]
        if not weighted:
            raise ConfigError("the tiny model has no Conv2d or Linear layer to widen")
        c, c_wide = None, None                           # current channels: tiny, widest
        for i, (name, m) in enumerate(order):
            key = str(len(self.layers))
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                c_in = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
                if c is None or isinstance(m, nn.Conv2d):
                    c_in_wide = c_in if c is None else c_wide
                else:                                    # a flatten before it: c channels × spatial positions
                    if c_in % c:
                        raise ConfigError(f"linear {name!r} takes {c_in} features after {c} channels; NetAug "
                                          "needs a channel-major flatten of whole channels")
                    c_in_wide = c_wide * (c_in // c)
                c_out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
                widen = i != weighted[-1]
                wide = _widened(name, m, c_in_wide, _scaled(c_out, self.max_width, widen))
                _share(wide, m)
                self.wide[key] = wide
                kind, c, c_wide = ("conv" if isinstance(m, nn.Conv2d) else "linear"), c_out, wide.weight.shape[0]
            elif isinstance(m, _BN):
                if c is None or m.num_features != c:
                    raise ConfigError(f"BatchNorm {name!r} normalises {m.num_features} channels, not the {c} its "
                                      "input layer gives")
                wide = _widened(name, m, c_wide, c_wide)
                _share(wide, m)
                self.wide[key] = wide
                kind, c_out, widen = "bn", c, True
            elif isinstance(m, _PARAMETER_FREE):
                self.fns[key] = copy.deepcopy(m)
                kind, c_out, widen = "fn", -1, False
            else:
                raise ConfigError(f"NetAug cannot widen {name!r} ({type(m).__name__}); supported: Conv2d, Linear, "
                                  f"BatchNorm1d/2d and {', '.join(t.__name__ for t in _PARAMETER_FREE)}")
            self.layers.append(_Layer(name, kind, c_out, widen))

    @torch.no_grad()
    def _check(self, tiny: nn.Module, x: torch.Tensor) -> None:
        modes = (tiny.training, self.training)
        tiny.eval()
        self.eval()
        ref, got = tiny(x), self(x, 1.0)
        tiny.train(modes[0])
        self.train(modes[1])
        if ref.shape != got.shape or not torch.allclose(ref, got, rtol=1e-4, atol=1e-5):
            raise ConfigError(f"{type(tiny).__name__}'s forward is not the chain of its layers (the supernet at "
                              "width 1 computes something else); NetAug supports plain sequential CNNs")

    def forward(self, x: torch.Tensor, width: float = 1.0) -> torch.Tensor:
        if not 1.0 <= width <= self.max_width:
            raise ConfigError(f"width must lie in [1, {self.max_width}] (the widest of {self.widths}), got {width}")
        for i, layer in enumerate(self.layers):
            key = str(i)
            if layer.kind == "fn":
                x = self.fns[key](x)
                continue
            m, o = self.wide[key], _scaled(layer.c_out, width, layer.widen)
            if layer.kind == "conv":
                c_in = x.shape[1]                                            # x: (B, c_in, H, W)
                x = F.conv2d(x, m.weight[:o, :c_in], None if m.bias is None else m.bias[:o], m.stride, m.padding,
                             m.dilation)                                     # (B, o, H', W')
            elif layer.kind == "linear":
                x = x.flatten(1)                                             # channel-major: (B, c·H·W)
                x = F.linear(x, m.weight[:o, :x.shape[1]], None if m.bias is None else m.bias[:o])
            else:
                x = _batch_norm(m, x, tiny=width == 1.0)
        return x

    @torch.no_grad()
    def extract(self) -> nn.Module:
        """A copy of the tiny model (its class and structure) holding the width-1 slices of the shared
        weights and BatchNorm buffers; its forward equals ``self(x, 1.0)``."""
        tiny = copy.deepcopy(self._template[0])
        for i, layer in enumerate(self.layers):
            if layer.kind == "fn":
                continue
            wide, target = self.wide[str(i)], find_module(tiny, layer.name)
            for pname, t in list(target.named_parameters(recurse=False)) + list(target.named_buffers(recurse=False)):
                src = getattr(wide, pname)
                t.copy_(src if t.ndim == 0 else src[tuple(slice(0, s) for s in t.shape)])
        tiny.train(self.training)
        return tiny


@torch.no_grad()
def _share(wide: nn.Module, tiny: nn.Module) -> None:
    """Copy ``tiny``'s parameters and buffers into the leading slice of ``wide``'s."""
    for pname, t in list(tiny.named_parameters(recurse=False)) + list(tiny.named_buffers(recurse=False)):
        w = getattr(wide, pname)
        if t.ndim == 0:
            w.copy_(t)
        else:
            w[tuple(slice(0, s) for s in t.shape)].copy_(t)


def _batch_norm(bn: nn.Module, x: torch.Tensor, tiny: bool) -> torch.Tensor:
    """The first ``x.shape[1]`` channels of the wide BatchNorm ``bn`` on ``x`` (B, c, …). At width 1 exactly as
    the tiny BatchNorm (running statistics used in eval, updated in training); wider: batch statistics."""
    c = x.shape[1]
    weight = bn.weight[:c] if bn.affine else None
    bias = bn.bias[:c] if bn.affine else None
    if not (tiny and bn.track_running_stats):
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, bn.eps)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:                                              # cumulative moving average
            factor = 1.0 / float(bn.num_batches_tracked)
    return F.batch_norm(x, bn.running_mean[:c], bn.running_var[:c], weight, bias, bn.training, factor, bn.eps)


def netaug_train(tiny: nn.Module, train_loader: Iterable, train: TrainConfig,
                 widths: Sequence[float] = (1.5, 2.0, 2.5, 3.0), alpha: float = 1.0,
                 eval_loader: Iterable | None = None, progress: bool | None = None,
                 example_input: torch.Tensor | None = None) -> dict[str, Any]:
    """Train ``tiny`` in place with NetAug on the shared :func:`~efficientml.train.fit` loop: the supernet is
    fit's model (its width-1 forward gives fit the tiny logits, evaluated as the tiny model), the loss adds
    ``alpha·CE`` of a subnet at a width drawn each step (seeded by ``train.seed``) from ``widths``.
    ``example_input`` defaults to the first two inputs of the loader.

    Returns ``{"history": History.to_dict() (each epoch also with ``loss_tiny`` and ``loss_wide``, the mean CE
    of both), "supernet": the trained AugmentedNet, "model": tiny}``; ``tiny`` holds the extracted weights."""
    if example_input is None:
        epoch = getattr(train_loader, "epoch", None)
        example_input = next(iter(train_loader))[0][:2]
        if isinstance(epoch, int):
            train_loader.epoch = epoch  # type: ignore[attr-defined]  # the peek must not shift the shuffling
    device = next((p.device for p in tiny.parameters()), torch.device("cpu"))
    net = AugmentedNet(tiny, widths, example_input.to(device))
    g = torch.Generator().manual_seed(train.seed)
    last: dict[str, torch.Tensor] = {}
    hook = net.register_forward_pre_hook(lambda m, args: last.__setitem__("x", args[0]))
    sums: dict[str, float] = defaultdict(float)
    count = [0]

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ce_tiny = F.cross_entropy(logits, y, label_smoothing=train.label_smoothing)
        width = net.widths[int(torch.randint(len(net.widths), (1,), generator=g))]
        ce_wide = F.cross_entropy(net(last["x"], width), y, label_smoothing=train.label_smoothing)
        sums["tiny"] += float(ce_tiny.detach())
        sums["wide"] += float(ce_wide.detach())
        count[0] += 1
        return ce_tiny + alpha * ce_wide

    def on_epoch_end(epoch: int, rec: dict) -> None:
        rec.update({f"loss_{k}": v / max(1, count[0]) for k, v in sums.items()})
        sums.clear()
        count[0] = 0

    try:
        hist = fit(net, train_loader, train, eval_loader=eval_loader, loss_fn=loss_fn, progress=progress,
                   on_epoch_end=on_epoch_end)
    finally:
        hook.remove()
    tiny.load_state_dict(net.extract().state_dict())
    return {"history": hist.to_dict(), "supernet": net, "model": tiny}
