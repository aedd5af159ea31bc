"""Feature distillation: FitNets hints, attention transfer, activation boundaries.

- **Hints** (Romero et al. 2015, FitNets): a learned 1×1 conv maps the student's feature map
  (B, C_s, H_s, W_s) to the teacher's channels (bilinear resize when the sizes differ);
  loss = mean squared error to the teacher's map (B, C_t, H_t, W_t).
- **Attention transfer** (Zagoruyko & Komodakis 2017). Activation-based: the map of a layer is
  Q = mean_c |a_c|^p over channels, flattened and L2-normalised per sample; loss = mean over batch and
  positions of (Q_s − Q_t)², the larger map average-pooled to the smaller's size first (the authors'
  code uses the same mean). Gradient-based: the map is built the same way from ∂CE/∂x, the gradient of
  each model's loss with respect to the input; normalising makes it independent of the two models'
  gradient scales (the paper matches the raw gradients, whose scales differ between networks).
- **Activation boundaries** (Heo et al. 2019): transfer where the teacher's neurons are on
  (pre-activation > 0) or off. With the student's (adapted) pre-activation s, teacher's t, margin μ:
  loss = mean( 1[t > 0]·relu(μ − s)² + 1[t ≤ 0]·relu(μ + s)² ), a hinge that is zero once every student
  neuron is on (≥ μ) or off (≤ −μ) together with its teacher neuron.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.errors import ShapeError


def _as_map(x: torch.Tensor, what: str) -> torch.Tensor:
    """(B, C) → (B, C, 1, 1); (B, C, H, W) unchanged; anything else is a ShapeError."""
    if x.ndim == 2:
        return x[:, :, None, None]
    if x.ndim != 4:
        raise ShapeError(f"{what} must be (B, C, H, W) or (B, C) features, got shape {tuple(x.shape)}")
    return x


def _check_batch(s: torch.Tensor, t: torch.Tensor) -> None:
    if s.shape[0] != t.shape[0]:
        raise ShapeError(f"student features {tuple(s.shape)} and teacher features {tuple(t.shape)} have different "
                         "batch sizes; both models must see the same batch")


class HintAdapter(nn.Module):
    """FitNets regressor: 1×1 conv C_s → C_t, then a bilinear resize to the teacher's spatial size.

    ``adapter(student, teacher)`` → hint loss (scalar); ``adapter.project(student, size)`` → the adapted
    map (B, C_t, *size), which the other feature losses reuse."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.student_channels, self.teacher_channels = student_channels, teacher_channels
        self.conv = nn.Conv2d(student_channels, teacher_channels, 1, bias=False)

    def project(self, student: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
        s = _as_map(student, "student features")
        if s.shape[1] != self.student_channels:
            raise ShapeError(f"this adapter expects {self.student_channels} student channels, got {s.shape[1]} "
                             f"(features of shape {tuple(student.shape)})")
        s = self.conv(s)                                        # (B, C_t, H_s, W_s)
        if tuple(s.shape[-2:]) != tuple(size):
            s = F.interpolate(s, size=tuple(size), mode="bilinear", align_corners=False)
        return s

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        t = _as_map(teacher, "teacher features")
        return hint_loss(self.project(student, t.shape[-2:]), t)


def hint_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the adapted student map and the teacher's (same shape, any rank);
    the teacher side is a fixed target (detached)."""
    if student.shape != teacher.shape:
        raise ShapeError(f"hint loss needs equal shapes; adapted student {tuple(student.shape)} vs teacher "
                         f"{tuple(teacher.shape)} (use HintAdapter to map channels and size)")
    return F.mse_loss(student.float(), teacher.detach().float())


def attention_map(features: torch.Tensor, p: float = 2.0, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, C, H, W) → (B, H'·W'): mean over channels of |a|^p, average-pooled to ``size`` if given,
    flattened and L2-normalised per sample."""
    f = _as_map(features, "features").float()
    q = f.abs().pow(p).mean(dim=1, keepdim=True)                # (B, 1, H, W)
    if size is not None and tuple(q.shape[-2:]) != tuple(size):
        q = F.adaptive_avg_pool2d(q, size)
    return F.normalize(q.flatten(1), dim=1)                     # (B, H'·W'), unit norm per row


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Activation-based attention transfer between one student and one teacher layer (channel counts may
    differ; the larger spatial map is pooled to the smaller size) = mean (Q_s − Q_t)²."""
    s, t = _as_map(student, "student features"), _as_map(teacher, "teacher features")
    _check_batch(s, t)
    size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
    return (attention_map(s, p, size) - attention_map(t.detach(), p, size)).pow(2).mean()


def gradient_attention_maps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: float = 1.0,
                            create_graph: bool = False) -> torch.Tensor:
    """Gradient-based attention: ∂CE(model(x), y)/∂x (B, C, H, W) turned into a normalised (B, H·W) map
    as :func:`attention_map` does (mean over channels of |g|^p). ``create_graph=True`` for the student,
    so the map stays differentiable in its parameters (double backpropagation)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x).float(), y)
        (grad,) = torch.autograd.grad(loss, x, create_graph=create_graph)
    return input_gradient_map(grad, p)


def input_gradient_map(grad: torch.Tensor, p: float = 1.0) -> torch.Tensor:
    """An input gradient (B, C, H, W) → normalised map (B, H·W); kept separate so a trainer that already
    has the student's graph can reuse its forward."""
    return attention_map(grad, p)


def gradient_attention_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between two normalised gradient maps (B, H·W) of the same input."""
    if student_map.shape != teacher_map.shape:
        raise ShapeError(f"gradient maps differ in shape: student {tuple(student_map.shape)}, teacher "
                         f"{tuple(teacher_map.shape)}; both must come from the same input batch")
    return (student_map - teacher_map.detach()).pow(2).mean()


def ab_loss(student_pre: torch.Tensor, teacher_pre: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Activation-boundary loss between pre-activations of equal shape (adapt the student first):
    mean( 1[t>0]·relu(μ − s)² + 1[t≤0]·relu(μ + s)² )."""
    if student_pre.shape != teacher_pre.shape:
        raise ShapeError(f"activation-boundary loss needs equal shapes; student {tuple(student_pre.shape)} vs "
                         f"teacher {tuple(teacher_pre.shape)} (map the student with a HintAdapter first)")
    s, on = student_pre.float(), (teacher_pre.detach() > 0).float()
    return (on * F.relu(margin - s).pow(2) + (1.0 - on) * F.relu(margin + s).pow(2)).mean()
