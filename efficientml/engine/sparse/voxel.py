"""Synthetic sparse voxel inputs and the dense reference for sparse convolution.

:func:`synthetic_voxels` samples points on random sphere and plane surfaces in a ``grid``³ box and
voxelizes them (floor, unique) until a target fraction of voxels is occupied — the thin-shell
structure of LiDAR scans and CAD surfaces, not uniform noise. :func:`dense_conv_reference` densifies
the input and runs ``torch.nn.functional.conv3d`` on a padded grid big enough that every sparse
output site lies inside it, then reads the output at those sites.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from efficientml.core.errors import ConfigError
from efficientml.engine.sparse.kernel_map import check_coords


def _surface_points(gen: torch.Generator, grid: int, n: int) -> torch.Tensor:
    """(n, 3) points on one random sphere (radius grid/8 … grid/2.5) or plane through the box."""
    if torch.rand((), generator=gen) < 0.6:
        centre = torch.rand(3, generator=gen) * grid
        radius = grid * (0.125 + 0.275 * torch.rand((), generator=gen))
        d = torch.randn(n, 3, generator=gen)
        return centre + radius * d / d.norm(dim=1, keepdim=True)
    normal = torch.randn(3, generator=gen)
    normal = normal / normal.norm()
    helper = torch.tensor([1.0, 0.0, 0.0]) if abs(normal[0]) < 0.9 else torch.tensor([0.0, 1.0, 0.0])
    a = torch.linalg.cross(normal, helper)                       # a, b span the plane
    a = a / a.norm()
    b = torch.linalg.cross(normal, a)
    uv = (torch.rand(n, 2, generator=gen) - 0.5) * grid * 1.5
    return torch.rand(3, generator=gen) * grid + uv[:, :1] * a + uv[:, 1:] * b


def synthetic_voxels(grid: int = 64, occupancy: float = 0.05, batch: int = 1, channels: int = 16,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(coords (N, 4) int64 (batch, x, y, z) in [0, grid)³, feats (N, channels) fp32) with
    N = round(occupancy · grid³) sites per batch item, on voxelized sphere/plane surfaces."""
    if not 0.0 < occupancy <= 0.5:
        raise ConfigError(f"occupancy must be in (0, 0.5], got {occupancy}")
    gen = torch.Generator().manual_seed(seed)
    target, per_surface = max(1, round(occupancy * grid ** 3)), 4 * grid * grid
    coords = []
    for b in range(batch):
        keys = torch.zeros(0, dtype=torch.int64)
        while keys.numel() < target:
            v = torch.floor(_surface_points(gen, grid, per_surface)).to(torch.int64)
            v = v[((v >= 0) & (v < grid)).all(1)]
            keys = torch.unique(torch.cat([keys, (v[:, 0] * grid + v[:, 1]) * grid + v[:, 2]]))
        keys = keys[torch.randperm(keys.numel(), generator=gen)[:target]].sort().values
        xyz = torch.stack([keys // (grid * grid), (keys // grid) % grid, keys % grid], 1)
        coords.append(torch.cat([torch.full((target, 1), b, dtype=torch.int64), xyz], 1))
    c = torch.cat(coords)
    return c, torch.randn(c.shape[0], channels, generator=gen)


def densify(coords: torch.Tensor, feats: torch.Tensor, shape: tuple[int, int, int], batch: int | None = None,
            offset: int = 0) -> torch.Tensor:
    """(B, C, X, Y, Z) dense tensor with ``feats`` at ``coords`` (shifted by ``offset``), zeros elsewhere."""
    check_coords(coords)
    c = coords.to(torch.int64)
    b = int(c[:, 0].max()) + 1 if batch is None else batch
    dense = feats.new_zeros(b, *shape, feats.shape[1])
    dense[c[:, 0], c[:, 1] + offset, c[:, 2] + offset, c[:, 3] + offset] = feats
    return dense.permute(0, 4, 1, 2, 3).contiguous()


def dense_conv_reference(coords: torch.Tensor, feats: torch.Tensor, dense_weight: torch.Tensor,
                         out_coords: torch.Tensor, stride: int = 1, bias: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """conv3d (padding K//2) of the densified input, read at ``out_coords`` → (M, Cout). The grid is
    padded by P = stride · K//2 voxels per side (a multiple of the stride keeps the output lattice), so
    output site o is dense output o + K//2 and every site of a regular conv's dilation is inside."""
    k = dense_weight.shape[-1]
    r = k // 2
    pad = stride * r
    c = coords.to(torch.int64)
    if c.numel() and int(c[:, 1:].min()) < 0:
        raise ConfigError("dense_conv_reference needs non-negative coords")
    extent = int(c[:, 1:].max()) + 1 + 2 * pad
    dense = densify(c, feats, (extent,) * 3, offset=pad)
    y = F.conv3d(dense, dense_weight, bias, stride=stride, padding=r)     # (B, Cout, X', Y', Z')
    o = out_coords.to(torch.int64)
    return y[o[:, 0], :, o[:, 1] + r, o[:, 2] + r, o[:, 3] + r]


def occupancy_of(coords: torch.Tensor, grid: int, batch: int = 1) -> float:
    """Fraction of the ``batch · grid³`` voxels that are active."""
    return coords.shape[0] / (batch * math.prod((grid, grid, grid)))
