"""Capture the outputs of named modules during a forward pass.

    with capture(model, ["features.relu0", "layer2"]) as feats:
        logits = model(x)
    feats["layer2"]            # (B, C, H, W), still attached to the autograd graph

Names are the dotted names of ``model.named_modules()``. Outputs are cloned by default: the zoo
models use ``ReLU(inplace=True)``, which would otherwise overwrite a captured BatchNorm output (the
pre-activation the activation-boundary loss needs) after its hook ran.
"""

from __future__ import annotations

import difflib
from typing import Sequence

import torch
import torch.nn as nn

from efficientml.core.errors import ConfigError, ShapeError


def find_module(model: nn.Module, name: str) -> nn.Module:
    """``model``'s submodule called ``name``; a ConfigError naming it and some valid names otherwise."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    valid = [n for n in modules if n]
    close = difflib.get_close_matches(name, valid, n=3)
    hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
    raise ConfigError(f"{type(model).__name__} has no module named {name!r}; {hint}valid names include "
                      f"{', '.join(map(repr, valid[:8]))}{' …' if len(valid) > 8 else ''}")


class FeatureCapture:
    """Forward hooks on ``names`` of ``model``; ``outputs[name]`` is the latest output of that module.

    Hooks stay until :meth:`close` (or the end of the ``with`` block), so one capture serves every
    training step. A module whose output is a tuple contributes its first element."""

    def __init__(self, model: nn.Module, names: Sequence[str], clone: bool = True):
        self.names = tuple(names)
        self.clone = clone
        self.outputs: dict[str, torch.Tensor] = {}
        modules = [find_module(model, n) for n in self.names]  # every name checked before any hook
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in zip(self.names, modules)]

    def _hook(self, name: str):
        def fn(module: nn.Module, args: tuple, out) -> None:
            if isinstance(out, (tuple, list)):
                out = out[0]
            if not isinstance(out, torch.Tensor):
                raise ShapeError(f"module {name!r} returned {type(out).__name__}; feature distillation needs a "
                                 "tensor output")
            self.outputs[name] = out.clone() if self.clone else out
        return fn

    def get(self) -> list[torch.Tensor]:
        """The captured outputs in the order of ``names``; a ConfigError if the forward skipped one."""
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise ConfigError(f"module(s) {missing} did not run in the last forward pass; pick modules the "
                              "model's forward calls")
        return [self.outputs[n] for n in self.names]

    def clear(self) -> None:
        self.outputs.clear()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> dict[str, torch.Tensor]:
        return self.outputs

    def __exit__(self, *exc: object) -> None:
        self.close()


def capture(model: nn.Module, names: Sequence[str], clone: bool = True) -> FeatureCapture:
    """A :class:`FeatureCapture`; as a context manager it yields the ``{name: output}`` dict."""
    return FeatureCapture(model, names, clone)


@torch.no_grad()
def output_shapes(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """(name, module, output shape) of every named submodule, in the order their forwards finished, from one
    forward of ``example_input`` in eval mode (the model's mode is restored)."""
    order: list[tuple[str, nn.Module, tuple[int, ...]]] = []

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, out) -> None:
            out = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(out, torch.Tensor):
                order.append((name, module, tuple(out.shape)))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    was = model.training
    model.eval()
    try:
        model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return order


def auto_layers(model: nn.Module, example_input: torch.Tensor, pre_activation: bool = False) -> tuple[str, ...]:
    """The layers feature distillation picks when none are named: one per spatial resolution.

    Candidates are the ``nn.ReLU`` modules with a (B, C, H, W) output, or, in a model without ReLU modules
    (functional ``F.relu``, as the CIFAR ResNets), the model's direct children; of each resolution the last
    candidate to run is picked. ``pre_activation``: the last BatchNorm that ran before each picked layer
    instead (the input of its ReLU). For the zoo models this gives:

    ============  ======================================  ==============================================
    model         layers                                  pre-activations
    ============  ======================================  ==============================================
    small_cnn     features.relu0, features.relu1          features.bn0, features.bn1
    vgg           backbone.relu1, relu3, relu5, relu7     backbone.bn1, bn3, bn5, bn7
    resnet20      layer1, layer2, layer3 (stage outputs)  layerK.2.bn2 (residual branch, before the sum)
    ============  ======================================  ==============================================
    """
    order = output_shapes(model, example_input)
    maps = [(i, n, m, s) for i, (n, m, s) in enumerate(order) if len(s) == 4]
    cands = [c for c in maps if isinstance(c[2], nn.ReLU)]
    if not cands:
        top = {n for n, _ in model.named_children()}
        cands = [c for c in maps if c[1] in top]
    last: dict[tuple[int, int], tuple[int, str]] = {}
    for i, name, _, shape in cands:
        last[shape[-2:]] = (i, name)                      # later candidates of a resolution replace earlier
    picked = sorted(last.values())
    if not picked:
        raise ConfigError(f"found no (B, C, H, W) feature maps in {type(model).__name__} to distill; name the "
                          "layers (student_layers / teacher_layers)")
    if not pre_activation:
        return tuple(name for _, name in picked)
    out = []
    for i, name in picked:
        bns = [n for n, m, _ in order[:i] if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            raise ConfigError(f"no BatchNorm runs before {name!r} in {type(model).__name__}; name the "
                              "pre-activation layers for method 'ab'")
        out.append(bns[-1])
    return tuple(out)
