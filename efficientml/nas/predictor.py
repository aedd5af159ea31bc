"""An MLP accuracy predictor on the space's architecture encoding (OFA's: a few hundred measured
subnets are enough to rank the rest), and its error as a function of the number of training samples."""

from __future__ import annotations

import random
from typing import Sequence

import torch
import torch.nn as nn

from efficientml.nas.space import Arch, MBSpace


class AccuracyPredictor(nn.Module):
    """encode(arch) → hidden layers (ReLU) → accuracy in points; targets are standardized internally."""

    def __init__(self, space: MBSpace, hidden: int = 128, layers: int = 3):
        super().__init__()
        self.space = space
        dims = [len(space.encode(space.largest()))] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*mods, nn.Linear(dims[-1], 1))
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("std", torch.ones(()))

    def features(self, archs: Sequence[Arch]) -> torch.Tensor:
        return torch.tensor([self.space.encode(a) for a in archs], dtype=torch.float32)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats).squeeze(-1) * self.std + self.mean

    @torch.no_grad()
    def predict(self, archs: Sequence[Arch] | Arch) -> torch.Tensor | float:
        single = isinstance(archs, Arch)
        out = self(self.features([archs] if single else archs))
        return float(out[0]) if single else out

    def fit(self, archs: Sequence[Arch], acc: Sequence[float], epochs: int = 500, lr: float = 1e-3,
            weight_decay: float = 1e-4, seed: int = 0) -> "AccuracyPredictor":
        """Full-batch Adam on the mean squared error (in standardized units)."""
        torch.manual_seed(seed)
        x, y = self.features(archs), torch.tensor(acc, dtype=torch.float32)
        self.mean.fill_(y.mean())
        self.std.fill_(y.std().clamp_min(1e-6) if len(acc) > 1 else 1.0)
        opt = torch.optim.Adam(self.net.parameters(), lr=lr, weight_decay=weight_decay)
        for _ in range(epochs):
            opt.zero_grad()
            loss = ((self.net(x).squeeze(-1) - (y - self.mean) / self.std) ** 2).mean()
            loss.backward()
            opt.step()
        return self.eval()


def rmse(pred: torch.Tensor, target: Sequence[float]) -> float:
    t = torch.tensor(target, dtype=torch.float32)
    return float(((pred - t) ** 2).mean().sqrt())


def error_vs_samples(space: MBSpace, archs: Sequence[Arch], acc: Sequence[float], test_archs: Sequence[Arch],
                     test_acc: Sequence[float], sizes: Sequence[int], seed: int = 0, **fit_kw) -> list[dict]:
    """RMSE (points) on the test set of a predictor fitted on the first n of a shuffled training set,
    for each n in ``sizes`` (ofa #30: how many samples are needed)."""
    idx = list(range(len(archs)))
    random.Random(seed).shuffle(idx)
    out = []
    for n in sizes:
        sel = idx[:n]
        p = AccuracyPredictor(space).fit([archs[i] for i in sel], [acc[i] for i in sel], seed=seed, **fit_kw)
        out.append({"samples": n, "rmse_points": rmse(p.predict(list(test_archs)), test_acc)})
    return out
