"""An ensemble of classifiers that averages their probabilities (born-again generations, mutual peers)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from efficientml.core.errors import ConfigError


class Ensemble(nn.Module):
    """``forward(x)`` → (B, classes) **log-probabilities** of the members' mean softmax:
    ``log((1/M)·Σ_m softmax(f_m(x)))``, computed as ``logsumexp_m(log_softmax(f_m(x))) − log M`` so that a
    probability that underflows in one member does not become ``log 0``.

    Log-probabilities are also valid logits: ``softmax`` of them is the mean probability itself, their
    argmax is the ensemble's prediction and ``cross_entropy`` of them is the NLL of the mean probability,
    so :func:`efficientml.train.evaluate` scores an ensemble as it scores a model. The members are shared,
    not copied; the ensemble's parameters are theirs."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) < 1:
            raise ConfigError("an ensemble needs at least one member model, got none")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([torch.log_softmax(m(x).float(), dim=-1) for m in self.members])  # (M, B, classes)
        return torch.logsumexp(logp, dim=0) - math.log(len(self.members))                 # (B, classes)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, classes) mean of the members' softmax probabilities."""
        return self.forward(x).exp()
