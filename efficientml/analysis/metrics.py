"""Quality metrics: accuracy, top-1 agreement, SQNR, perplexity; comparing two models' outputs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from efficientml.core.errors import ShapeError


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ShapeError(f"{what} needs tensors of the same shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")


def accuracy(logits: torch.Tensor, targets: torch.Tensor, topk: int = 1) -> float:
    """Fraction of rows whose target is among the ``topk`` largest logits (class dim last)."""
    if logits.shape[:-1] != targets.shape:
        raise ShapeError(f"accuracy needs logits (..., classes) and targets (...), got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    if targets.numel() == 0:
        return float("nan")
    top = logits.topk(min(topk, logits.shape[-1]), dim=-1).indices      # (..., k)
    return (top == targets.unsqueeze(-1)).any(-1).float().mean().item()


def top1_agreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    """Fraction of rows on which two models predict the same class."""
    _check_same_shape(logits_a, logits_b, "top-1 agreement")
    return (logits_a.argmax(-1) == logits_b.argmax(-1)).float().mean().item()


def sqnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10·log10(Σ ref² / Σ (ref − test)²)``.

    ``inf`` when the tensors are identical.
    """
    _check_same_shape(reference, test, "SQNR")
    ref = reference.detach().double()
    noise = (ref - test.detach().double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def mean_nll(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> float:
    """Mean negative log-likelihood (nats) of ``targets`` under ``logits`` (class dim last)."""
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
        ignore_index=ignore_index).item()


def perplexity(mean_nll_nats: float) -> float:
    """Perplexity from the mean per-token negative log-likelihood in nats: ``exp(mean NLL)``."""
    return math.exp(mean_nll_nats)


@dataclass(frozen=True)
class OutputComparison:
    """How far a test model's outputs are from a reference model's on the same inputs."""

    sqnr_db: float
    top1_agreement: float | None   # None when the outputs are not (…, classes) logits
    max_abs_diff: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_outputs(reference: torch.Tensor, test: torch.Tensor) -> OutputComparison:
    _check_same_shape(reference, test, "comparing outputs")
    agree = top1_agreement(reference, test) if reference.dim() >= 2 else None
    diff = (reference.detach().float() - test.detach().float()).abs()
    return OutputComparison(sqnr(reference, test), agree,
                            diff.max().item() if diff.numel() else 0.0)


def compare_models(reference: nn.Module, test: nn.Module, inputs: Any) -> OutputComparison:
    """Run both models (eval mode, no grad) on ``inputs`` and compare their outputs."""
    from efficientml.analysis.inputs import make_inputs
    from efficientml.analysis.trace import eval_mode

    args, kwargs = make_inputs(reference, inputs=inputs)
    outs = []
    for m in (reference, test):
        with eval_mode(m), torch.inference_mode():
            out = m(*args, **kwargs)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return compare_outputs(outs[0], outs[1])
