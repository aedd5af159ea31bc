"""Mixed precision: per-layer weight bit widths under a model-size budget, guided by sensitivity.

Sensitivity of layer l at b bits = logit SQNR (dB) when only that layer's weights are quantized
(symmetric per channel, RTN) on a calibration batch. Quantization noise powers add roughly across
layers, so the search starts every layer at the widest width and repeatedly narrows the layer whose
step costs the least added noise per byte saved, until the weights fit the budget. Sweeping the
budget gives a size–accuracy Pareto front (:func:`pareto_front`, :func:`plot_pareto`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from efficientml.core.config import Config
from efficientml.core.errors import ConfigError
from efficientml.core.lazy import optional_import
from efficientml.core.modules import named_layers
from efficientml.quant.grid import fake_quantize
from efficientml.quant.rounding import weight_spec


@dataclass(frozen=True)
class MixedPrecisionConfig(Config):
    kind = "mixed_precision"
    candidate_bits: tuple = (2, 3, 4, 6, 8)
    size_budget_bytes: int | None = None

    def validate(self) -> None:
        if not self.candidate_bits or any(not isinstance(b, int) or not 1 <= b <= 8 for b in self.candidate_bits):
            raise ConfigError(f"candidate_bits must be integers in 1..8, got {self.candidate_bits!r}")


def _sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    noise = (ref - test).pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * torch.log10(ref.pow(2).sum() / noise).item()


@torch.no_grad()
def layer_sensitivity(model: nn.Module, batch: torch.Tensor, bits: tuple[int, ...] = (2, 3, 4, 6, 8)
                      ) -> dict[str, dict[int, float]]:
    """{layer: {bits: logit SQNR in dB with only that layer quantized}}."""
    model = model.eval()
    ref = model(batch)
    out: dict[str, dict[int, float]] = {}
    for name, layer in named_layers(model, (nn.Conv2d, nn.Linear)):
        w = layer.weight.detach().clone()
        out[name] = {}
        for b in bits:
            layer.weight.copy_(fake_quantize(w, weight_spec(b)))
            out[name][b] = _sqnr_db(ref, model(batch))
        layer.weight.copy_(w)
    return out


def weight_bytes(sizes: dict[str, int], bits: dict[str, int]) -> float:
    return sum(sizes[n] * bits[n] for n in sizes) / 8


def search_bits(sensitivity: dict[str, dict[int, float]], sizes: dict[str, int], budget_bytes: float
                ) -> dict[str, int]:
    """Greedy: narrow the layer with the least added noise power per byte saved until under budget."""
    cands = {n: sorted(s) for n, s in sensitivity.items()}
    bits = {n: c[-1] for n, c in cands.items()}
    noise = {n: {b: 10 ** (-db / 10) for b, db in s.items()} for n, s in sensitivity.items()}
    if weight_bytes(sizes, {n: c[0] for n, c in cands.items()}) > budget_bytes:
        raise ConfigError(f"a size budget of {budget_bytes:.0f} bytes is below the smallest possible "
                          f"model ({weight_bytes(sizes, {n: c[0] for n, c in cands.items()}):.0f} bytes)")
    while weight_bytes(sizes, bits) > budget_bytes:
        best, best_cost = None, float("inf")
        for n, b in bits.items():
            i = cands[n].index(b)
            if i == 0:
                continue
            nb = cands[n][i - 1]
            saved = sizes[n] * (b - nb) / 8
            cost = (noise[n][nb] - noise[n][b]) / saved
            if cost < best_cost:
                best, best_cost = (n, nb), cost
        assert best is not None
        bits[best[0]] = best[1]
    return bits


@torch.no_grad()
def apply_bits(model: nn.Module, bits: dict[str, int]) -> nn.Module:
    """A copy of ``model`` with each layer's weights fake-quantized to its bit width."""
    model = copy.deepcopy(model)
    mods = dict(model.named_modules())
    for n, b in bits.items():
        mods[n].weight.copy_(fake_quantize(mods[n].weight, weight_spec(b)))
    return model


def layer_sizes(model: nn.Module) -> dict[str, int]:
    return {n: m.weight.numel() for n, m in named_layers(model, (nn.Conv2d, nn.Linear))}


def pareto_front(points: list[dict[str, Any]], x: str = "size_bytes", y: str = "accuracy") -> list[dict[str, Any]]:
    """Points not dominated (smaller x and higher y is better), sorted by x."""
    front, best_y = [], float("-inf")
    for p in sorted(points, key=lambda p: (p[x], -p[y])):
        if p[y] > best_y:
            front.append(p)
            best_y = p[y]
    return front


def plot_pareto(points: list[dict[str, Any]], path: str | Path, x: str = "size_bytes", y: str = "accuracy",
                title: str = "Mixed precision: size vs accuracy") -> Path:
    """Scatter all points and draw the Pareto front; matplotlib is imported only here."""
    mpl = optional_import("matplotlib", "plot", "the Pareto plot")
    mpl.use("Agg")
    plt = optional_import("matplotlib.pyplot", "plot", "the Pareto plot")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter([p[x] / 1024 for p in points], [p[y] for p in points], s=14, alpha=0.6, label="configurations")
    front = pareto_front(points, x, y)
    ax.plot([p[x] / 1024 for p in front], [p[y] for p in front], "r-o", ms=4, label="Pareto front")
    ax.set_xlabel("weight size (KiB)")
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
