"""The sparse-execution part of the engine benchmark (issue #22 item 6): EIE-style sparse × sparse
fully-connected layers and TorchSparse-style sparse convolution, each timed against the dense op on
the same data (median of repeated runs via :func:`efficientml.analysis.latency.measure_latency`, at
1 and 2 threads) and checked against it.

``run_sparse_benchmark(quick)`` returns ``{"eie": rows, "conv": rows, "eie_*", "sparse_conv_*" …}``;
``sparse_conv_vs_dense_speedup`` is the main config: a submanifold 3×3×3 conv, 16 → 32 channels, on a
64³ grid at 5% occupancy, 2 threads, kernel-map build *included*, against dense conv3d on that grid.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.analysis.latency import measure_latency
from efficientml.engine.sparse.conv import SparseConv3d, sparse_conv3d
from efficientml.engine.sparse.eie import SparseLinear, kernel_status, magnitude_prune, to_csc
from efficientml.engine.sparse.kernel_map import build_kernel_map
from efficientml.engine.sparse.voxel import densify, synthetic_voxels

WEIGHT_SPARSITY = (0.5, 0.8, 0.9, 0.95)
ACT_SPARSITY = (0.0, 0.5, 0.7, 0.9)
OCCUPANCY = (0.01, 0.02, 0.05, 0.10)


def _ms(fn, threads: int, runs: int, warmup: int = 2) -> float:
    return measure_latency(fn, (), warmup=warmup, runs=runs, threads=threads).median_ms


def _relu_input(n: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """(1, n) non-negative activations with exactly round(sparsity · n) zeros (a ReLU's output)."""
    x = torch.rand(1, n, generator=gen) + 0.01
    x[0, torch.randperm(n, generator=gen)[:round(sparsity * n)]] = 0.0
    return x


def eie_table(shape: tuple[int, int], threads: tuple[int, ...], runs: int) -> list[dict]:
    """Dense ``F.linear`` vs the EIE kernel (fp32 and int8) at batch 1 over weight × activation sparsity."""
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(shape[1], shape[0])
    rows = []
    for ws in WEIGHT_SPARSITY:
        w = magnitude_prune(lin.weight.detach(), ws)
        layers = {dt: SparseLinear(to_csc(w, dt), lin.bias) for dt in ("fp32", "int8")}
        b = lin.bias.detach()
        for xs in ACT_SPARSITY:
            x = _relu_input(shape[1], xs, gen)
            err = float((layers["fp32"](x) - F.linear(x, w, b)).abs().max())
            for th in threads:
                dense = _ms(lambda: F.linear(x, w, b), th, runs)
                t32 = _ms(lambda: layers["fp32"](x), th, runs)
                t8 = _ms(lambda: layers["int8"](x), th, runs)
                rows.append(dict(weight_sparsity=ws, act_sparsity=xs, threads=th, dense_ms=dense,
                                 eie_fp32_ms=t32, eie_int8_ms=t8, speedup_fp32=dense / t32,
                                 speedup_int8=dense / t8, max_abs_err_fp32=err))
    return rows


def _conv_row(grid: int, occ: float, cin: int, cout: int, stride: int, threads: int, runs: int,
              dense_cache: dict) -> dict:
    coords, feats = synthetic_voxels(grid, occ, channels=cin, seed=1)
    conv = SparseConv3d(cin, cout, 3, stride, submanifold=stride == 1)
    w, wd = conv.weight.detach(), conv.dense_weight().detach().contiguous()
    dense_in = densify(coords, feats, (grid,) * 3)
    key = (cin, cout, stride, threads)
    if key not in dense_cache:       # dense conv3d costs the same at any occupancy
        dense_cache[key] = _ms(lambda: F.conv3d(dense_in, wd, stride=stride, padding=1), threads, runs, 1)
    kmap = build_kernel_map(coords, 3, stride, stride == 1)
    t_map = _ms(lambda: build_kernel_map(coords, 3, stride, stride == 1), threads, runs, 1)
    t = {g: _ms(lambda: sparse_conv3d(feats, kmap, w, None, g), threads, runs) for g in ("none", "adaptive")}
    with torch.no_grad():
        ref = F.conv3d(dense_in, wd, stride=stride, padding=1)
        o = kmap.out_coords
        inside = ((o[:, 1:] >= 0) & (o[:, 1:] < ref.shape[-1])).all(1)   # regular conv: sites in conv3d's output
        oc = o[inside]
        got = sparse_conv3d(feats, kmap, w)[inside]
        err = float((got - ref[oc[:, 0], :, oc[:, 1], oc[:, 2], oc[:, 3]]).abs().max())
    dense = dense_cache[key]
    return dict(grid=grid, occupancy=occ, sites=int(coords.shape[0]), cin=cin, cout=cout, stride=stride,
                kind="submanifold" if stride == 1 else "regular", threads=threads, dense_ms=dense,
                map_ms=t_map, per_offset_ms=t["none"], grouped_ms=t["adaptive"],
                speedup=dense / (t_map + t["none"]), speedup_map_cached=dense / t["none"],
                grouped_vs_per_offset=t["none"] / t["adaptive"], max_abs_err=err)


def conv_table(grid: int, channels: list[tuple[int, int]], strides: tuple[int, ...], threads: tuple[int, ...],
               runs: int) -> list[dict]:
    """Sparse vs dense conv3d over occupancy × channels × stride × threads."""
    rows, cache = [], {}
    for cin, cout in channels:
        for s in strides:
            for th in threads:
                rows += [_conv_row(grid, occ, cin, cout, s, th, runs, cache) for occ in OCCUPANCY]
    return rows


def run_sparse_benchmark(quick: bool = True) -> dict:
    """The sparse-execution tables and headline numbers (quick: smaller FC layer, fewer configs, ~20 s)."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    eie = eie_table((2048, 2048) if quick else (4096, 4096), (1, 2), 10 if quick else 40)
    conv = conv_table(64, [(16, 32)] if quick else [(16, 32), (32, 32)], (1,) if quick else (1, 2),
                      (2,) if quick else (1, 2), 3 if quick else 7)
    main = [r for r in conv if r["occupancy"] == 0.05 and (r["cin"], r["cout"]) == (16, 32)
            and r["stride"] == 1 and r["threads"] == 2]
    low = [r for r in conv if r["occupancy"] <= 0.05 and r["stride"] == 1]
    best = max(eie, key=lambda r: r["speedup_fp32"])
    at_90 = [r for r in eie if (r["weight_sparsity"], r["act_sparsity"], r["threads"]) == (0.9, 0.7, 2)]
    return {
        "sparse_conv_vs_dense_speedup": main[0]["speedup"],
        "sparse_conv_vs_dense_speedup_map_cached": main[0]["speedup_map_cached"],
        "sparse_conv_min_speedup_le_5pct": min(r["speedup"] for r in low),
        "sparse_conv_max_abs_err": max(r["max_abs_err"] for r in conv),
        "sparse_conv_grouped_vs_per_offset": main[0]["grouped_vs_per_offset"],
        "eie_speedup_fp32_w90_a70_2t": at_90[0]["speedup_fp32"],
        "eie_speedup_int8_w90_a70_2t": at_90[0]["speedup_int8"],
        "eie_best_speedup_fp32": best["speedup_fp32"],
        "eie_pays_fraction_fp32": sum(r["speedup_fp32"] > 1 for r in eie) / len(eie),
        "eie_max_abs_err_fp32": max(r["max_abs_err_fp32"] for r in eie),
        "eie_kernel": kernel_status(),
        "eie_shape": [2048, 2048] if quick else [4096, 4096],
        "eie": eie, "conv": conv, "quick": quick, "seconds": time.perf_counter() - t0,
    }
