"""Relational distillation: what the teacher knows about how layers and samples relate.

- **FSP** (Yim et al. 2017, "flow of solution procedure"): for two layers' features a (B, C1, H, W) and
  b (B, C2, H, W), G = a · bᵀ / (H·W) over spatial positions, a (B, C1, C2) Gram matrix; the loss is the
  mean of (G_s − G_t)² over batch and entries. Student and teacher Grams must have the same C1 × C2:
  :class:`efficientml.distill.Distiller` first maps the student's channels with 1×1 adapters. When the two
  layers' spatial sizes differ, the larger map is average-pooled to the smaller.
- **RKD** (Park et al. 2019) on embeddings (B, D): *distance* — pairwise Euclidean distances of distinct
  samples divided by their mean (so scaling the embedding changes nothing), compared with smooth-L1;
  *angle* — for every triplet with apex i and ends j, k (both ≠ i) the cosine of the angle between
  e_j − e_i and e_k − e_i, compared with smooth-L1.
- **Similarity-preserving** (Tung & Mori 2019): G = F Fᵀ (B, B) of the flattened features, each row
  L2-normalised; loss = ‖G_s − G_t‖²_F / B². Channel counts and sizes of student and teacher may differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from efficientml.core.errors import ShapeError


def fsp_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, C1, H, W), (B, C2, H', W') → (B, C1, C2) = a·bᵀ / (H·W), the larger map pooled to the smaller."""
    if a.ndim != 4 or b.ndim != 4 or a.shape[0] != b.shape[0]:
        raise ShapeError(f"an FSP matrix needs two (B, C, H, W) maps of one batch, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    a, b = F.adaptive_avg_pool2d(a.float(), size), F.adaptive_avg_pool2d(b.float(), size)
    return a.flatten(2) @ b.flatten(2).transpose(1, 2) / (size[0] * size[1])   # (B, C1, C2)


def fsp_loss(student_a: torch.Tensor, student_b: torch.Tensor, teacher_a: torch.Tensor,
             teacher_b: torch.Tensor) -> torch.Tensor:
    """mean (G_s − G_t)² of the FSP matrices of (student_a, student_b) and (teacher_a, teacher_b)."""
    g_s = fsp_matrix(student_a, student_b)
    g_t = fsp_matrix(teacher_a.detach(), teacher_b.detach())
    if g_s.shape != g_t.shape:
        raise ShapeError(f"FSP matrices differ: student {tuple(g_s.shape[1:])} vs teacher {tuple(g_t.shape[1:])} "
                         "(C1 × C2); the student's channel counts must equal the teacher's, map them with a "
                         "HintAdapter first")
    return (g_s - g_t).pow(2).mean()


def _embedding(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.ndim < 2 or x.shape[0] < 2:
        raise ShapeError(f"{what} must be a batch of at least 2 samples (B, …), got shape {tuple(x.shape)}")
    return x.float().flatten(1)                                  # (B, D)


def _check_pair(s: torch.Tensor, t: torch.Tensor) -> None:
    if s.shape[0] != t.shape[0]:
        raise ShapeError(f"student ({s.shape[0]}) and teacher ({t.shape[0]}) batch sizes differ; both must see "
                         "the same batch")


def rkd_distances(e: torch.Tensor) -> torch.Tensor:
    """(B, D) → (B, B) pairwise Euclidean distances divided by their mean over distinct pairs."""
    d = torch.cdist(e, e)                                         # (B, B), zero diagonal
    off = ~torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d / d[off].mean().clamp(min=1e-12)


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between the normalised distance matrices, over pairs of distinct samples."""
    s, t = _embedding(student, "student embedding"), _embedding(teacher.detach(), "teacher embedding")
    _check_pair(s, t)
    off = ~torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    return F.smooth_l1_loss(rkd_distances(s)[off], rkd_distances(t)[off])


def rkd_angles(e: torch.Tensor) -> torch.Tensor:
    """(B, D) → (B, B, B): [i, j, k] = cos of the angle at e_i between e_j − e_i and e_k − e_i."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], dim=2)      # (B, B, D): [i, j] = unit(e_j − e_i)
    return diff @ diff.transpose(1, 2)                            # (B, B, B)


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between the triplet-angle cosines, over triplets whose ends both differ from the apex."""
    s, t = _embedding(student, "student embedding"), _embedding(teacher.detach(), "teacher embedding")
    _check_pair(s, t)
    b = s.shape[0]
    ne = ~torch.eye(b, dtype=torch.bool, device=s.device)
    keep = ne[:, :, None] & ne[:, None, :]                         # j ≠ i and k ≠ i
    return F.smooth_l1_loss(rkd_angles(s)[keep], rkd_angles(t)[keep])


def rkd_loss(student: torch.Tensor, teacher: torch.Tensor, distance_weight: float = 1.0,
             angle_weight: float = 2.0) -> torch.Tensor:
    """distance_weight · distance loss + angle_weight · angle loss (the paper's 25 : 50 ratio)."""
    return (distance_weight * rkd_distance_loss(student, teacher)
            + angle_weight * rkd_angle_loss(student, teacher))


def similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """(B, …) → (B, B) batch Gram of the flattened features, each row L2-normalised."""
    f = _embedding(features, "features")
    return F.normalize(f @ f.t(), dim=1)


def sp_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving loss ‖G_s − G_t‖²_F / B²."""
    _check_pair(student, teacher)
    b = student.shape[0]
    return (similarity_matrix(student) - similarity_matrix(teacher.detach())).pow(2).sum() / (b * b)
