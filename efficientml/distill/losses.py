"""Logit distillation (Hinton et al. 2015) as a loss term for :func:`efficientml.train.fit`."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch; T² keeps the gradient scale of the
    soft targets independent of T."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)   # (B, classes)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * t * t


def kd_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """(B, classes) logits of both → (B,) per-sample T²·KL(softmax(t/T) ‖ softmax(s/T)); its mean is
    :func:`kd_loss`."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)   # (B, classes)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * t * t  # (B,)


class TeacherLoss:
    """``extra_loss`` for :func:`~efficientml.train.fit`: ``weight · kd_loss(student, teacher(x))``.

    ``fit`` hands ``extra_loss`` the logits but not the input, so a forward pre-hook on the student keeps
    the batch it was called with; the frozen teacher sees that same (augmented) batch. Use as a context
    manager, or call :meth:`close`, to remove the hook."""

    def __init__(self, teacher: nn.Module, student: nn.Module, temperature: float = 4.0, weight: float = 1.0):
        self.teacher, self.temperature, self.weight = teacher.eval(), temperature, weight
        for p in teacher.parameters():
            p.requires_grad_(False)
        self._x: torch.Tensor | None = None
        self._hook = student.register_forward_pre_hook(self._keep_input)

    def _keep_input(self, module: nn.Module, args: tuple) -> None:
        self._x = args[0]

    def __call__(self, model: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits = self.teacher(self._x)
        return self.weight * kd_loss(logits, t_logits, self.temperature)

    def close(self) -> None:
        self._hook.remove()

    def __enter__(self) -> "TeacherLoss":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
