"""W4A16 fused Triton matmul vs dense bf16 on CUDA, batch-1 decode shapes of a 7B MLP (quick check).

    python benchmarks/gpu_wq_check.py --out DIR     # writes DIR/llm_wq_gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from efficientml.analysis import measure_latency
from efficientml.llm.kernels.qlinear import QuantLinear
from efficientml.llm.compress.rtn import quantize_weight
from efficientml.quant.grid import weight_grid


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "dtype": "bfloat16", "rows": {}}
    for n, k in ((11008, 4096), (4096, 11008)):
        w = torch.randn(n, k) * 0.02
        ql = QuantLinear.from_quantized(quantize_weight(w, weight_grid(bits=4, group_size=128)),
                                        scale_dtype=torch.bfloat16).cuda()
        dense = torch.nn.Linear(k, n, bias=False).cuda().to(torch.bfloat16)
        dense.weight.data.copy_(ql.dequantize(torch.float32).to(torch.bfloat16))
        for t in (1, 16):
            x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
            err = (ql(x).float() - dense(x).float()).abs().max().item()
            d = measure_latency(dense, x, 10, 100).median_ms
            q = measure_latency(ql, x, 10, 100).median_ms
            res["rows"][f"{n}x{k}_tok{t}"] = {"dense_ms": d, "w4_fused_ms": q, "speedup": d / q,
                                              "max_abs_diff_vs_dense_dequant": err, "kind": "measured"}
            print(n, k, t, res["rows"][f"{n}x{k}_tok{t}"], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "llm_wq_gpu.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
