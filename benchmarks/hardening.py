"""Issue #16 targets: the model matrix, the default ONNX export in ORT, the KL observer, int8
first-call latency and the bad-input suite's counts → benchmarks/results/hardening.json.

    python benchmarks/hardening.py            # full: matrix at 224×224 (the committed JSON)
    python benchmarks/hardening.py --quick --out /tmp/h.json   # matrix at 32×32
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from efficientml.analysis.latency import measure_latency  # noqa: E402
from efficientml.analysis.metrics import sqnr  # noqa: E402
from efficientml.analysis.record import BenchmarkRecord, default_out, log  # noqa: E402
from efficientml.models import build_model  # noqa: E402
from efficientml.quant import IntegerConfig, convert_integer  # noqa: E402
from tests.models.matrix import MODELS, conv_counts, ort_op_counts, passing, run_matrix  # noqa: E402


def part_matrix(rec: BenchmarkRecord, quick: bool) -> None:
    res = run_matrix(tuple(MODELS), resolution=32 if quick else 224, batch=4 if quick else 8)
    rec.results["matrix"] = res
    n = passing(res)
    rec.target("matrix_models_passing", n, "==", len(MODELS),
               note=f"models whose profile, prune, int8 and onnx steps all passed, of {len(MODELS)} tried")


def part_onnx_default(rec: BenchmarkRecord, quick: bool) -> None:
    from efficientml.quant.export import export_onnx

    model = build_model("mobilenetv2").eval()
    x = torch.randn(4, 3, 64 if quick else 224, 64 if quick else 224)
    im = convert_integer(model, [x], IntegerConfig())
    with tempfile.TemporaryDirectory() as d:
        counts, _ = ort_op_counts(export_onnx(im, Path(d) / "mbv2.onnx", x[:1]), x)
    q, f = conv_counts(counts)
    rec.results["ort_default_export"] = {"qlinearconv": q, "float_conv": f, "ops": counts}
    rec.target("ort_int8_qlinearconv_fraction", round(q / max(1, q + f), 4), "==", 1.0,
               note="zoo MobileNetV2, IntegerConfig() defaults, ORT all optimizations")


def part_kl(rec: BenchmarkRecord, quick: bool) -> None:
    from efficientml.data.cifar_samples import load_cifar_samples
    from efficientml.models.resnet_cifar import PRETRAINED_MEAN, PRETRAINED_STD

    model = build_model("resnet20", pretrained=True).eval()
    x, _ = load_cifar_samples(normalize=True, mean=PRETRAINED_MEAN, std=PRETRAINED_STD)
    with torch.no_grad():
        ref = model(x)
        db = {o: sqnr(ref, convert_integer(model, [x], IntegerConfig(observer=o))(x)) for o in ("kl", "minmax")}
    rec.results["kl_observer"] = {"model": "resnet20 (pretrained, CIFAR-10 samples)", "sqnr_db": db}
    rec.target("kl_observer_sqnr_vs_minmax_db", round(db["kl"] - db["minmax"], 2), ">=", -1.0,
               note="logits SQNR vs fp32: KL minus min-max, IntegerConfig defaults otherwise")


def part_latency(rec: BenchmarkRecord, quick: bool) -> None:
    model = build_model("mobilenetv2").eval()
    res = 64 if quick else 224
    calib = torch.randn(4, 3, res, res)
    x1 = torch.randn(1, 3, res, res)
    lat = {}
    for first in (1, 8):
        fast = convert_integer(model, [calib], IntegerConfig()).with_mode("fast")
        with torch.no_grad():
            fast(torch.randn(first, 3, res, res))
        lat[first] = measure_latency(fast, (x1,), warmup=3, runs=5 if quick else 30, threads=1).median_ms
    rec.results["int8_first_call_latency_ms"] = lat
    rec.target("int8_first_call_batch_latency_ratio", round(lat[8] / lat[1], 3), "<=", 1.1,
               note="batch-1 latency after a first call at batch 8 ÷ after one at batch 1 (fast mode)")


def part_bad_inputs(rec: BenchmarkRecord, quick: bool) -> None:
    try:
        from tests.cli.bad_inputs import summary
    except ImportError as e:
        note = f"tests/cli/bad_inputs.py not available on this branch ({e})"
        for tid, op, thr in (("bad_input_cases", ">=", 150), ("bad_input_tracebacks", "==", 0),
                             ("bad_input_files_lost", "==", 0)):
            rec.target(tid, None, op, thr, note=note)
        return
    s = summary()
    rec.results["bad_inputs"] = s
    rec.target("bad_input_cases", s["cases"], ">=", 150)
    rec.target("bad_input_tracebacks", s["tracebacks"], "==", 0)
    rec.target("bad_input_files_lost", s["files_lost"], "==", 0)


PARTS = {"matrix": part_matrix, "onnx": part_onnx_default, "kl": part_kl, "latency": part_latency,
         "bad_inputs": part_bad_inputs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small resolutions, few runs (CI)")
    ap.add_argument("--out", default=None, help="where to write the JSON")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    args = ap.parse_args()
    rec = BenchmarkRecord("hardening", device="cpu")
    for name in args.parts.split(","):
        log(f"hardening: {name}")
        PARTS[name](rec, args.quick)
    log(f"wrote {rec.write(default_out('hardening', args.quick, args.out))}")


if __name__ == "__main__":
    main()
