"""Offline distillation: a frozen, trained teacher teaches a student on the shared training loop.

    hist = distill(student, teacher, train_loader, DistillConfig(method="kd", temperature=4, alpha=0.9),
                   TrainConfig(epochs=5, lr=0.05), eval_loader=test_loader)

:func:`distill` builds a :class:`~efficientml.distill.methods.Distiller`, hands its loss to
:func:`efficientml.train.fit` as ``loss_fn`` (the batch reaches it through the distiller's forward pre-hook
on the student, as :class:`~efficientml.distill.TeacherLoss` does), and optimizes the student together with
the distiller's adapters (one optimizer, :func:`~efficientml.train.loop.make_optimizer`'s groups: weight
decay on matrices and kernels, none on biases and norms). Each epoch's record in the returned history
also holds the mean of every loss part (``ce``, ``kd``, the method's term) over its steps. Method ``none``
trains exactly as ``fit`` with cross-entropy does.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch
import torch.nn as nn

from efficientml.distill.methods import FEATURE_METHODS, DistillConfig, Distiller
from efficientml.train.config import TrainConfig
from efficientml.train.loop import History, fit, make_optimizer


def distill(student: nn.Module, teacher: nn.Module, train_loader: Iterable, config: DistillConfig,
            train: TrainConfig, eval_loader: Iterable | None = None, progress: bool | None = None,
            example_input: torch.Tensor | None = None) -> History:
    """Train ``student`` in place under ``config``'s distillation loss; the teacher is frozen (eval mode,
    no gradients). ``example_input`` sizes the adapters of feature methods; by default the first two
    inputs of ``train_loader`` (a loader that counts its epochs, as efficientml's TensorLoader, is set
    back so that the peek does not shift the shuffling)."""
    if example_input is None and config.method in FEATURE_METHODS:
        example_input = _peek(train_loader)
    with Distiller(student, teacher, config, example_input, label_smoothing=train.label_smoothing) as d:
        sums: dict[str, float] = defaultdict(float)
        count = [0]

        def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss, parts = d.loss(d.last_input, y, logits)
            for k, v in parts.items():
                sums[k] += v
            count[0] += 1
            return loss

        def on_epoch_end(epoch: int, rec: dict) -> None:
            rec.update({f"loss_{k}": v / max(1, count[0]) for k, v in sums.items()})
            sums.clear()
            count[0] = 0

        opt = make_optimizer(nn.ModuleList([student, d]), train)  # the adapters learn with the student
        return fit(student, train_loader, train, eval_loader=eval_loader, loss_fn=loss_fn, optimizer=opt,
                   progress=progress, on_epoch_end=on_epoch_end)


def _peek(loader: Iterable) -> torch.Tensor:
    epoch = getattr(loader, "epoch", None)
    x = next(iter(loader))[0][:2]
    if isinstance(epoch, int):
        loader.epoch = epoch  # type: ignore[attr-defined]
    return x
