"""Sparse execution (Lec04's systems; issue #22 item 6).

- :mod:`.eie` — EIE-style weight-sparse × activation-sparse fully-connected layers: magnitude-pruned
  weights in partitioned CSC (fp32, or int8 with per-row scales), zero activations skipped, a C kernel.
- :mod:`.kernel_map`, :mod:`.conv` — TorchSparse-style sparse 3-D convolution on voxel coordinates:
  kernel maps by sorting or a direct-address table, submanifold and regular (strided) conv,
  gather–GEMM–scatter per offset with optional adaptive grouping.
- :mod:`.voxel` — synthetic voxelized point clouds and the dense conv3d reference.
- :mod:`.bench` — :func:`run_sparse_benchmark` for ``benchmarks/engine.py``.

>>> layer = SparseLinear.from_dense(nn.Linear(4096, 4096), 0.9)           # doctest: +SKIP
>>> y = SparseConv3d(16, 32)(SparseVoxels(coords, feats))                 # doctest: +SKIP
"""

from efficientml.engine.sparse.conv import SparseConv3d, SparseVoxels, plan_groups, sparse_conv3d
from efficientml.engine.sparse.eie import CSCWeight, SparseLinear, eie_matvec, kernel_status, magnitude_prune, to_csc
from efficientml.engine.sparse.kernel_map import KernelMap, build_kernel_map, output_coords
from efficientml.engine.sparse.voxel import dense_conv_reference, densify, synthetic_voxels

__all__ = ["SparseConv3d", "SparseVoxels", "plan_groups", "sparse_conv3d", "CSCWeight", "SparseLinear",
           "eie_matvec", "kernel_status", "magnitude_prune", "to_csc", "KernelMap", "build_kernel_map",
           "output_coords", "dense_conv_reference", "densify", "synthetic_voxels"]
