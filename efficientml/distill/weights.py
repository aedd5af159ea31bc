"""Intermediate weight matching: pull a student layer's weight towards a teacher layer's.

For weights W_s (O_s, I_s, *k) and W_t (O_t, I_t, *k) (conv kernels or linear matrices; the kernel
sizes ``k`` must agree), a learned map on each dimension that differs brings the student's weight into
the teacher's shape, ``Ŵ = P_out · W_s · P_inᵀ`` applied over the out and in dimensions, and the
loss is ``mean (Ŵ − W_t)²``. ``P`` is a full (O_t × O_s) matrix, or with ``rank=r`` the product
A (O_t × r) · B (r × O_s), which holds (O_t + O_s)·r numbers instead of O_t·O_s. A dimension that already
agrees gets no map (identity), so equal shapes give plain MSE between the weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from efficientml.core.errors import ConfigError, ShapeError


class DimMap(nn.Module):
    """A learned linear map from ``n_in`` to ``n_out`` rows, full or of rank ``rank``."""

    def __init__(self, n_in: int, n_out: int, rank: int | None = None):
        super().__init__()
        if rank is not None and not 1 <= rank <= min(n_in, n_out):
            raise ConfigError(f"weight-map rank must be in 1…{min(n_in, n_out)} for a {n_in}→{n_out} map, "
                              f"got {rank}")
        self.n_in, self.n_out, self.rank = n_in, n_out, rank
        if rank is None:
            self.a = nn.Parameter(torch.randn(n_out, n_in) / math.sqrt(n_in))
            self.b = None
        else:
            self.a = nn.Parameter(torch.randn(n_out, rank) / math.sqrt(rank))
            self.b = nn.Parameter(torch.randn(rank, n_in) / math.sqrt(n_in))

    def matrix(self) -> torch.Tensor:
        return self.a if self.b is None else self.a @ self.b   # (n_out, n_in)


class WeightMatcher(nn.Module):
    """Holds the maps for one (student weight, teacher weight) pair; ``matcher(w_s, w_t)`` → loss."""

    def __init__(self, student_shape: tuple[int, ...] | torch.Size, teacher_shape: tuple[int, ...] | torch.Size,
                 rank: int | None = None):
        super().__init__()
        s, t = tuple(student_shape), tuple(teacher_shape)
        if len(s) != len(t) or len(s) < 2 or s[2:] != t[2:]:
            raise ShapeError(f"weight matching needs two weights (out, in, *kernel) with the same kernel size; got "
                             f"student {s} and teacher {t}")
        self.student_shape, self.teacher_shape = s, t
        self.out_map = DimMap(s[0], t[0], rank) if s[0] != t[0] else None
        self.in_map = DimMap(s[1], t[1], rank) if s[1] != t[1] else None

    def mapped(self, w_s: torch.Tensor) -> torch.Tensor:
        """The student's weight in the teacher's shape: P_out · W_s · P_inᵀ over dims 0 and 1."""
        if tuple(w_s.shape) != self.student_shape:
            raise ShapeError(f"this matcher was built for a student weight {self.student_shape}, got "
                             f"{tuple(w_s.shape)}")
        w = w_s.float()
        if self.out_map is not None:
            w = torch.einsum("po,oi...->pi...", self.out_map.matrix(), w)   # (O_t, I_s, *k)
        if self.in_map is not None:
            w = torch.einsum("qi,oi...->oq...", self.in_map.matrix(), w)    # (O_t, I_t, *k)
        return w

    def forward(self, w_s: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
        if tuple(w_t.shape) != self.teacher_shape:
            raise ShapeError(f"this matcher was built for a teacher weight {self.teacher_shape}, got "
                             f"{tuple(w_t.shape)}")
        return weight_loss(self.mapped(w_s), w_t)


def weight_loss(student_weight: torch.Tensor, teacher_weight: torch.Tensor) -> torch.Tensor:
    """mean (W_s − W_t)² for weights of equal shape; the teacher's is a fixed target."""
    if student_weight.shape != teacher_weight.shape:
        raise ShapeError(f"weight loss needs equal shapes, got {tuple(student_weight.shape)} and "
                         f"{tuple(teacher_weight.shape)} (use WeightMatcher to map them)")
    return (student_weight.float() - teacher_weight.detach().float()).pow(2).mean()
