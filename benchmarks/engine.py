"""The int8 CNN engine (issue #22): bit-exactness of the generated C on every zoo CNN, the memory planner
and patch-based inference against the per-layer schedule, latency against PyTorch's quantized ops and
ONNX Runtime's integer kernels, Winograd against im2col, the Cortex-M build under QEMU, and sparse
execution. Writes benchmarks/results/engine.json (schema: ../shared/BENCHMARKS.md).

CPU, batch 1, 2 threads. Parts (``--parts``; default all):

- ``bitexact``: every zoo CNN (random weights, calibrated and checked on the 20 real CIFAR-10 samples at
  32×32; the trained Fashion-MNIST checkpoints on real test images) → ``engine_bitexact_all_zoo``;
- ``planner``: MobileNetV2 at 224×224, the arena against ``analysis``'s per-layer peak →
  ``planner_peak_vs_per_layer``;
- ``patch``: the same network patch by patch → ``patch_peak_reduction``, ``patch_latency_overhead``;
- ``latency``: MobileNetV2 at 224×224 and the trained VGG at 28×28: the engine, our int8 on PyTorch's
  quantized kernels, ONNX Runtime int8 (the project's QDQ export, QLinearConv verified) and fp32 beside
  them, interleaved rounds → ``engine_vs_torch_int8``, ``engine_vs_ort_int8`` (the worse of the two
  models; both listed);
- ``winograd``: the VGG's stride-1 3×3 layers, Winograd F(2×2, 3×3) against im2col → ``winograd_vs_im2col_3x3``;
- ``mcu``: the trained VGG cross-compiled for a Cortex-M3, run under qemu-system-arm (mps2-an385) on real
  test images → ``mcu_qemu_bitexact``, ``mcu_flash_kb``, ``mcu_sram_kb``;
- ``sparse``: EIE-style sparse × sparse FC and submanifold / regular sparse 3D convolution against dense
  → ``sparse_conv_vs_dense_speedup``;
- ``demo``: ``efficientml demo`` in a fresh process → ``demo_seconds``.

    python benchmarks/engine.py                           # full (the committed JSON)
    python benchmarks/engine.py --quick --out /tmp/e.json  # small budgets: proves every part runs
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from efficientml.analysis.record import (BenchmarkRecord, add_part_options, default_out, log,  # noqa: E402
                                         merge_records, run_parts, selected_parts)
from benchmarks.engine_parts import (State, part_bitexact, part_demo, part_latency, part_mcu,  # noqa: E402
                                     part_patch, part_planner, part_sparse, part_winograd)

PARTS = {"bitexact": part_bitexact, "planner": part_planner, "patch": part_patch, "latency": part_latency,
         "winograd": part_winograd, "mcu": part_mcu, "sparse": part_sparse, "demo": part_demo}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_part_options(ap, PARTS)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    out = default_out("engine", args.quick, args.out)
    if args.merge:
        merge_records([json.loads(Path(p).read_text()) for p in args.merge], "engine").write(out)
        return 0
    torch.set_num_threads(args.threads)
    rec = BenchmarkRecord("engine")
    st = State(args.quick, args.threads, rec, Path(tempfile.mkdtemp(prefix="eml-engine-bench-")))

    def done(name: str, seconds: float) -> None:
        rec.results.setdefault("seconds", {})[name] = round(seconds, 1)
        rec.write(out)

    t0 = time.perf_counter()
    run_parts(PARTS, selected_parts(PARTS, args.parts), st, after=done)
    log(f"wrote {out} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
