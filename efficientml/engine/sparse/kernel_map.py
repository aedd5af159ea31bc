"""Kernel maps for sparse 3-D convolution on voxel coordinates (TorchSparse, Tang et al., MLSys 2022).

A sparse tensor is ``coords`` (N, 4) int (batch, x, y, z) of its active sites plus ``feats`` (N, C).
A convolution with kernel size K (odd) and stride s computes, for every output site o and kernel
offset d ∈ {-(K//2) … K//2}³, the product of the input at s·o + d with the offset's weight (the
cross-correlation ``torch.nn.functional.conv3d`` computes with padding K//2). The *kernel map* lists,
per offset, the pairs (input row, output row) for which the input site s·o + d is active.

Coordinates are linearized into int64 keys over a box that holds every site queried (so a shifted key
never wraps into another row or batch); the input keys are sorted once and each offset's queries are
one ``torch.searchsorted`` — the sort-based alternative to a hash table, vectorized over all offsets.

Output sites:

- **submanifold** (s = 1): the input sites themselves (the active set does not dilate layer after layer);
- **regular**, stride 1: the dilation of the active set, {q − d};
- **regular**, stride s: the downsampled dilation {(q − d) / s : q active, s divides q − d per axis} —
  exactly the dense output positions that receive at least one active input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from efficientml.core.errors import ConfigError, ShapeError

TABLE_MAX = 1 << 24      # direct-address table cells (int64: 128 MiB) above which the map sorts instead


def check_coords(coords: torch.Tensor) -> None:
    """Raise unless ``coords`` is an (N, 4) integer tensor (batch, x, y, z) with batch ≥ 0."""
    if not isinstance(coords, torch.Tensor) or coords.dim() != 2 or coords.shape[1] != 4:
        shape = tuple(coords.shape) if isinstance(coords, torch.Tensor) else type(coords).__name__
        raise ShapeError(f"coords must be an (N, 4) tensor of (batch, x, y, z), got {shape}")
    if coords.is_floating_point() or coords.is_complex() or coords.dtype == torch.bool:
        raise ShapeError(f"coords must be an integer tensor (int32/int64), got {coords.dtype}")
    if coords.numel() and int(coords[:, 0].min()) < 0:
        raise ShapeError("coords' batch column (column 0) must be non-negative")


def kernel_offsets(kernel_size: int) -> torch.Tensor:
    """(K³, 3) int64 offsets d in the order of conv3d's weight (kx, ky, kz) flattened, d = k − K//2."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ConfigError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    r = torch.arange(kernel_size, dtype=torch.int64) - kernel_size // 2
    return torch.cartesian_prod(r, r, r).reshape(-1, 3)


@dataclass(frozen=True)
class KeySpace:
    """Linearization of (batch, x, y, z) over the box ``lo`` … ``lo + size − 1`` (per spatial axis)."""

    lo: torch.Tensor        # (3,) int64
    size: torch.Tensor      # (3,) int64

    @classmethod
    def covering(cls, *boxes: tuple[torch.Tensor, torch.Tensor]) -> "KeySpace":
        lo = torch.stack([b[0] for b in boxes]).amin(0)
        hi = torch.stack([b[1] for b in boxes]).amax(0)
        return cls(lo, hi - lo + 1)

    def keys(self, coords: torch.Tensor) -> torch.Tensor:
        """(N,) int64 keys of (N, 4) coords inside the box."""
        c = coords.to(torch.int64)
        x, y, z = (c[:, 1:] - self.lo).unbind(1)
        sx, sy, sz = self.size.tolist()
        return ((c[:, 0] * sx + x) * sy + y) * sz + z

    def per_batch(self) -> int:
        return int(self.size.prod())

    def volume(self, batches: int) -> int:
        """Number of keys of ``batches`` batch items (the direct-address table's length)."""
        return batches * self.per_batch()

    def deltas(self, offsets: torch.Tensor) -> torch.Tensor:
        """(K³,) key shifts of spatial offsets (valid while the shifted site stays inside the box)."""
        _, sy, sz = self.size.tolist()
        return (offsets[:, 0] * sy + offsets[:, 1]) * sz + offsets[:, 2]


def _box(coords: torch.Tensor, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    c = coords[:, 1:].to(torch.int64)
    return c.amin(0) - pad, c.amax(0) + pad


def output_coords(coords: torch.Tensor, kernel_size: int, stride: int, submanifold: bool) -> torch.Tensor:
    """The output sites (M, 4) int64 for a convolution of the active sites ``coords`` (see the module doc)."""
    check_coords(coords)
    if stride < 1:
        raise ConfigError(f"stride must be a positive integer, got {stride}")
    if submanifold:
        if stride != 1:
            raise ConfigError(f"a submanifold convolution has stride 1 (output sites = input sites), got {stride}")
        return coords.to(torch.int64)
    c = coords.to(torch.int64)
    offs = kernel_offsets(kernel_size)
    cand = c[None, :, 1:] - offs[:, None, :]                      # (K³, N, 3): q − d
    keep = (cand % stride == 0).all(-1)                            # s divides q − d on every axis
    sites = torch.cat([c[:, :1].expand(offs.shape[0], -1, 1), torch.div(cand, stride, rounding_mode="floor")], -1)
    sites = sites[keep]                                            # (≤K³N, 4)
    if sites.numel() == 0:
        return sites.reshape(0, 4)
    space = KeySpace.covering(_box(sites))
    keys = torch.unique(space.keys(sites))                         # sorted, so output rows are in key order
    return _decode(keys, space)


def _decode(keys: torch.Tensor, space: KeySpace) -> torch.Tensor:
    """The (M, 4) coords of sorted keys (inverse of :meth:`KeySpace.keys`)."""
    sx, sy, sz = space.size.tolist()
    z = keys % sz
    y = (keys // sz) % sy
    x = (keys // (sz * sy)) % sx
    b = keys // (sz * sy * sx)
    return torch.stack([b, x + space.lo[0], y + space.lo[1], z + space.lo[2]], 1)


@dataclass(frozen=True)
class KernelMap:
    """Per kernel offset k: ``in_idx[k]`` and ``out_idx[k]`` (int64, equal lengths) — the input rows
    whose site is stride · o + d_k for the output row o. ``out_coords`` (M, 4) are the output sites."""

    in_idx: tuple[torch.Tensor, ...]
    out_idx: tuple[torch.Tensor, ...]
    out_coords: torch.Tensor
    kernel_size: int
    stride: int
    submanifold: bool
    plans: dict = field(default_factory=dict, compare=False, repr=False)   # grouped gather/scatter indices

    def sizes(self) -> list[int]:
        return [int(t.numel()) for t in self.in_idx]


def build_kernel_map(coords: torch.Tensor, kernel_size: int = 3, stride: int = 1,
                     submanifold: bool = True, method: str = "auto") -> KernelMap:
    """The kernel map of a sparse conv over the active sites ``coords`` (N, 4): every output site's K³
    neighbours s·o + d looked up at once, by ``method``: ``"sort"`` (sorted keys + ``searchsorted``),
    ``"table"`` (direct-address table over the key box) or ``"auto"`` (the table while the box has at
    most :data:`TABLE_MAX` cells, else sorting)."""
    out = output_coords(coords, kernel_size, stride, submanifold)
    offs = kernel_offsets(kernel_size)
    c = coords.to(torch.int64)
    n_off, r = offs.shape[0], kernel_size // 2
    if method not in ("auto", "sort", "table"):
        raise ConfigError(f"method must be 'auto', 'sort' or 'table', got {method!r}")
    if c.shape[0] == 0 or out.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return KernelMap((empty,) * n_off, (empty,) * n_off, out, kernel_size, stride, submanifold)
    base = torch.cat([out[:, :1], out[:, 1:] * stride], 1)         # s·o (batch kept)
    space = KeySpace.covering(_box(c), _box(base, r))
    in_keys = space.keys(c)
    queries = space.keys(base)[None, :] + space.deltas(offs)[:, None]   # (K³, M), all inside the box
    use_table = method == "table" or (method == "auto" and space.volume(int(c[:, 0].max()) + 1) <= TABLE_MAX)
    found = _lookup_table(in_keys, queries, space) if use_table else _lookup_sorted(in_keys, queries)
    k_idx, o_idx = (found >= 0).nonzero(as_tuple=True)             # sorted by offset k, then output row
    counts = torch.bincount(k_idx, minlength=n_off).tolist()
    in_idx = torch.split(found[k_idx, o_idx], counts)
    return KernelMap(tuple(in_idx), torch.split(o_idx, counts), out, kernel_size, stride, submanifold)


def _lookup_sorted(in_keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Input row of every query key, −1 where absent: sort the keys once, binary-search all queries."""
    sorted_keys, order = torch.sort(in_keys)
    _check_unique(sorted_keys)
    pos = torch.searchsorted(sorted_keys, queries).clamp_(max=sorted_keys.numel() - 1)
    return torch.where(sorted_keys[pos] == queries, order[pos], -1)


def _lookup_table(in_keys: torch.Tensor, queries: torch.Tensor, space: KeySpace) -> torch.Tensor:
    """The same through a direct-address table over the key box (a perfect hash; small boxes only)."""
    table = torch.full((space.volume(int(in_keys.max()) // space.per_batch() + 1),), -1, dtype=torch.int64)
    table[in_keys] = torch.arange(in_keys.numel())
    if int((table >= 0).sum()) != in_keys.numel():
        _check_unique(torch.sort(in_keys).values)
    return table[queries]


def _check_unique(sorted_keys: torch.Tensor) -> None:
    if bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
        raise ShapeError("coords contain the same (batch, x, y, z) site twice; voxelize to unique sites first")
