"""CNN transfer learning with the memory measured: the recipe the CLI (``efficientml finetune resnet20
--method tinytl --dataset fashion-mnist``) and benchmarks/finetune.py share.

    model, config = prepare_cnn(build_model("resnet20", pretrained=True), "tinytl", num_classes=10)
    report = transfer(model, train_loader, test_loader, TrainConfig(epochs=1, optimizer="adamw", lr=1e-3))

Methods (``CNN_METHODS``): "full" (every weight, batch norm in training mode), "last-layer" (a new
head only), "bitfit" (biases, batch-norm shifts and the head, on PyTorch's own convs: they still keep
their inputs), "tinytl" (biases + lite residuals + head on the activation-free frozen path). Every
method but "full" keeps the batch-norm statistics fixed. A grayscale dataset feeds a 3-channel model
by repeating its channel.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn as nn

from efficientml.core.config import Config
from efficientml.core.errors import ConfigError
from efficientml.core.transform import apply
from efficientml.finetune.bitfit import BitFitConfig
from efficientml.finetune.inject import trainable_parameters
from efficientml.finetune.lean_ops import make_lean
from efficientml.finetune.memory import training_memory
from efficientml.finetune.tinytl import LastLayerConfig, TinyTLConfig, new_head

CNN_METHODS = ("full", "last-layer", "bitfit", "tinytl")


def prepare_cnn(model: nn.Module, method: str, num_classes: int,
                tinytl: TinyTLConfig | None = None) -> tuple[nn.Module, Config | None]:
    """``model`` (in place) ready for ``method`` with a new ``num_classes`` head; the config applied."""
    if method not in CNN_METHODS:
        raise ConfigError(f"CNN fine-tuning method must be one of {', '.join(CNN_METHODS)}, got {method!r}")
    if method == "full":
        new_head(model, num_classes)
        for p in model.parameters():
            p.requires_grad_(True)
        return model, None
    if method == "tinytl":
        cfg = tinytl or TinyTLConfig()
        d = cfg.to_dict()
        d.pop("__kind__")
        cfg = TinyTLConfig(**{**d, "num_classes": num_classes})
        return apply(model, cfg, inplace=True).model, cfg
    make_lean(model, kinds=("batchnorm",))  # fixed statistics, trainable shifts
    if method == "last-layer":
        cfg = LastLayerConfig(num_classes=num_classes)
        return apply(model, cfg, inplace=True).model, cfg
    new_head(model, num_classes)
    cfg = BitFitConfig(train_head=True)
    return apply(model, cfg, inplace=True).model, cfg


class ChannelRepeat:
    """A loader whose images get ``channels`` channels by repeating a single one (grayscale → RGB)."""

    def __init__(self, loader: Any, channels: int) -> None:
        self.loader, self.channels = loader, channels

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            yield (x.expand(-1, self.channels, -1, -1).contiguous() if x.shape[1] != self.channels else x), y


def transfer(model: nn.Module, train_loader: Any, test_loader: Any, train_cfg: Any,
             progress: bool | None = None) -> dict[str, Any]:
    """Measure one step's training memory on the first training batch (lr 0: nothing moves), train
    with the shared loop, evaluate; returns memory, history, accuracy and trainable counts."""
    from efficientml.train import evaluate, fit

    x, y = next(iter(train_loader))
    dev = next(model.parameters()).device
    model.train()
    memory = training_memory(model, x.to(dev), y.to(dev), lr=0.0)
    hist = fit(model, train_loader, train_cfg, progress=progress)
    ev = evaluate(model, test_loader)
    return {"memory": memory, "train": hist.to_dict(), "accuracy": ev["accuracy"], "eval_loss": ev["loss"],
            "trainable": trainable_parameters(model)}
