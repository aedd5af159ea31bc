"""Be Your Own Teacher (Zhang et al. 2019): a network distils its deepest classifier into shallow heads on its
own intermediate stages, in one training run, with no separate teacher.

Each head k reads a stage's output: a 1×1 bottleneck conv (to the width D of the feature that feeds the
model's classifier, its last ``nn.Linear``) + BatchNorm + ReLU + global average pooling gives a feature
f_k (B, D), a linear layer its logits z_k. With z the model's own logits and f its classifier input, the loss
of a batch is

    L = CE(z, y) + Σ_k [(1 − α)·CE(z_k, y) + α·T²·KL(softmax(z/T).detach() ‖ softmax(z_k/T))
                        + λ·mean_b ‖f_k − f.detach()‖²]

(λ = ``feature_weight``; the squared L2 distance is summed over the D features and averaged over the batch).
The heads' gradients reach the stages below them, which is what trains the backbone better. The heads are
hooks and a separate module (:class:`SelfDistillHeads`): at inference the model is the unchanged network;
:meth:`SelfDistillHeads.evaluate` scores every head as an early-exit classifier.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.errors import ConfigError
from efficientml.distill.hooks import FeatureCapture, auto_layers, find_module, output_shapes
from efficientml.distill.losses import kd_loss
from efficientml.train.config import TrainConfig
from efficientml.train.loop import fit, make_optimizer


class HeadOutputs(NamedTuple):
    logits: torch.Tensor                 # (B, classes) the model's own (deepest) classifier
    head_logits: list[torch.Tensor]      # K × (B, classes)
    head_features: list[torch.Tensor]    # K × (B, D)
    deep_feature: torch.Tensor           # (B, D) the input of the model's classifier


class _Head(nn.Module):
    """Stage output (B, C, H, W) or (B, C) → (feature (B, D), logits (B, classes))."""

    def __init__(self, shape: tuple[int, ...], dim: int, num_classes: int):
        super().__init__()
        c = shape[1]
        if len(shape) == 4:
            self.bottleneck = nn.Sequential(nn.Conv2d(c, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(),
                                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        elif len(shape) == 2:
            self.bottleneck = nn.Sequential(nn.Linear(c, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU())
        else:
            raise ConfigError(f"a self-distillation head reads (B, C, H, W) or (B, C) stage outputs, got {shape}")
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.bottleneck(x)                                   # (B, D)
        return f, self.fc(f)


def _classifier(model: nn.Module) -> tuple[str, nn.Linear]:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear classifier for the heads to learn from")
    return linears[-1]


class SelfDistillHeads(nn.Module):
    """Shallow classifier heads on ``stages`` (dotted module names) of ``model``; ``parameters()`` are the
    heads' only (the model is not a submodule). ``stages=None``: :func:`~efficientml.distill.hooks.auto_layers`
    (one layer per resolution) minus the last, whose resolution the model's own classifier already serves
    (small_cnn: ``features.relu0``; resnet20: ``layer1``, ``layer2``). ``example_input`` (a batch the model
    accepts) sizes the heads; ``num_classes`` defaults to the classifier's outputs.

    Hooks (on the stages, and on the classifier's input) are attached on construction and removed by
    :meth:`close` / the end of a ``with`` block; :meth:`attach` puts them back. While attached, every forward
    of the model fills them and :meth:`outputs` runs the heads on what they hold."""

    def __init__(self, model: nn.Module, stages: Sequence[str] | None = None, num_classes: int | None = None, *,
                 example_input: torch.Tensor):
        super().__init__()
        self._model = (model,)                                   # a tuple: not registered as a submodule
        self.classifier_name, classifier = _classifier(model)
        if stages is None:
            stages = auto_layers(model, example_input)[:-1]
            if not stages:
                raise ConfigError(f"{type(model).__name__} has a single feature resolution; name the stages "
                                  "for the heads")
        self.stages = tuple(stages)
        for s in self.stages:
            find_module(model, s)
        shapes = {n: s for n, _, s in output_shapes(model, example_input)}
        missing = [s for s in self.stages if s not in shapes]
        if missing:
            raise ConfigError(f"stage(s) {missing} did not return a tensor in a forward pass of "
                              f"{type(model).__name__}; pick modules the forward calls")
        n_cls = num_classes or classifier.out_features
        self.heads = nn.ModuleList(_Head(shapes[s], classifier.in_features, n_cls) for s in self.stages)
        self.to(next((p.device for p in model.parameters()), torch.device("cpu")))
        self._cap: FeatureCapture | None = None
        self._hook: Any = None
        self._deep: torch.Tensor | None = None
        self.attach()

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    def attach(self) -> "SelfDistillHeads":
        """Put the hooks on the model (no-op if they are on)."""
        if self._cap is None:
            self._cap = FeatureCapture(self.model, self.stages)
            self._hook = find_module(self.model, self.classifier_name).register_forward_pre_hook(self._keep_deep)
        return self

    def _keep_deep(self, module: nn.Module, args: tuple) -> None:
        self._deep = args[0].flatten(1)                          # (B, D)

    def outputs(self, logits: torch.Tensor) -> HeadOutputs:
        """The heads on the model's latest forward, whose (B, classes) logits are ``logits``."""
        if self._cap is None or self._deep is None:
            raise ConfigError("SelfDistillHeads: call the model (with the hooks attached) before outputs()")
        feats, head_logits = [], []
        for head, x in zip(self.heads, self._cap.get()):
            f, z = head(x)
            feats.append(f)
            head_logits.append(z)
        return HeadOutputs(logits, head_logits, feats, self._deep)

    def forward(self, x: torch.Tensor) -> HeadOutputs:
        """A batch (B, …) → the model's logits and every head's outputs (hooks must be attached)."""
        if self._cap is None:
            raise ConfigError("SelfDistillHeads were closed; call attach() before a forward")
        return self.outputs(self.model(x))

    @torch.inference_mode()
    def evaluate(self, loader: Iterable) -> dict[str, Any]:
        """Top-1 accuracy (percent) of the model (``accuracy``) and of each head (``head_accuracy``, in the
        order of ``stages``) over ``loader``; modes and hooks are restored afterwards."""
        attached, modes = self._cap is not None, (self.model.training, self.training)
        self.attach()
        self.model.eval()
        self.eval()
        device = self.heads[0].fc.weight.device
        correct, head_correct, seen = 0, [0] * len(self.heads), 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = self(x)
            correct += int((out.logits.argmax(1) == y).sum())
            for k, z in enumerate(out.head_logits):
                head_correct[k] += int((z.argmax(1) == y).sum())
            seen += y.shape[0]
        self.model.train(modes[0])
        self.train(modes[1])
        if not attached:
            self.close()
        if seen == 0:
            raise ConfigError("the evaluation loader yields no examples; expected at least one")
        return {"accuracy": 100.0 * correct / seen, "head_accuracy": [100.0 * c / seen for c in head_correct],
                "examples": seen}

    def close(self) -> None:
        """Remove the hooks; the model is left exactly as it was built."""
        if self._cap is not None:
            self._cap.close()
            self._hook.remove()
        self._cap, self._hook, self._deep = None, None, None

    def __enter__(self) -> "SelfDistillHeads":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def byot_loss(out: HeadOutputs, y: torch.Tensor, alpha: float = 0.3, temperature: float = 3.0,
              feature_weight: float = 0.03, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The BYOT loss ``L`` of the module docstring for labels ``y`` (B,), and its parts for logging: ``ce``
    (deepest) and, per head k, ``head{k}_ce``, ``head{k}_kd`` (T²·KL), ``head{k}_feature`` (mean ‖f_k − f‖²)."""
    ce = F.cross_entropy(out.logits, y, label_smoothing=label_smoothing)
    total, parts = ce, {"ce": float(ce.detach())}
    z_deep, f_deep = out.logits.detach(), out.deep_feature.detach()
    for k, (z, f) in enumerate(zip(out.head_logits, out.head_features)):
        ce_k = F.cross_entropy(z, y, label_smoothing=label_smoothing)
        kd_k = kd_loss(z, z_deep, temperature)
        feat_k = (f.float() - f_deep.float()).pow(2).sum(1).mean()          # (B, D) → mean over B of ‖·‖²
        total = total + (1 - alpha) * ce_k + alpha * kd_k + feature_weight * feat_k
        parts.update({f"head{k}_ce": float(ce_k.detach()), f"head{k}_kd": float(kd_k.detach()),
                      f"head{k}_feature": float(feat_k.detach())})
    return total, parts


def byot_train(model: nn.Module, train_loader: Iterable, train: TrainConfig, alpha: float = 0.3,
               temperature: float = 3.0, feature_weight: float = 0.03, stages: Sequence[str] | None = None,
               eval_loader: Iterable | None = None, progress: bool | None = None,
               example_input: torch.Tensor | None = None) -> dict[str, Any]:
    """Train ``model`` in place with BYOT heads on the shared :func:`~efficientml.train.fit` loop (one
    optimizer over model and heads). ``example_input`` defaults to the first two inputs of the loader.

    Returns ``{"history": fit's History.to_dict() (each epoch also with ``loss_<part>`` means of
    :func:`byot_loss`'s parts), "stages": the heads' stage names, "heads": the trained
    :class:`SelfDistillHeads` (hooks removed; ``attach()`` to use them)}`` and, with ``eval_loader``,
    ``accuracy`` (the model) and ``head_accuracy`` (per head)."""
    if example_input is None:
        epoch = getattr(train_loader, "epoch", None)
        example_input = next(iter(train_loader))[0][:2]
        if isinstance(epoch, int):
            train_loader.epoch = epoch  # type: ignore[attr-defined]  # the peek must not shift the shuffling
    heads = SelfDistillHeads(model, stages, example_input=example_input.to(next(model.parameters()).device))
    sums: dict[str, float] = defaultdict(float)
    count = [0]

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss, parts = byot_loss(heads.outputs(logits), y, alpha, temperature, feature_weight, train.label_smoothing)
        for k, v in parts.items():
            sums[k] += v
        count[0] += 1
        return loss

    def on_epoch_end(epoch: int, rec: dict) -> None:
        rec.update({f"loss_{k}": v / max(1, count[0]) for k, v in sums.items()})
        sums.clear()
        count[0] = 0

    try:
        heads.train()
        opt = make_optimizer(nn.ModuleList([model, heads]), train)
        hist = fit(model, train_loader, train, eval_loader=eval_loader, loss_fn=loss_fn, optimizer=opt,
                   progress=progress, on_epoch_end=on_epoch_end)
        result: dict[str, Any] = {"history": hist.to_dict(), "stages": heads.stages, "heads": heads}
        if eval_loader is not None:
            ev = heads.evaluate(eval_loader)
            result["accuracy"], result["head_accuracy"] = ev["accuracy"], ev["head_accuracy"]
    finally:
        heads.close()
    return result
