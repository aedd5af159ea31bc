"""Hardening benchmark (issue #16): the CNN path on architectures we did not design, and the command
line under bad input. Writes benchmarks/results/hardening.json (schema: ../shared/BENCHMARKS.md).

Parts (``--parts``):

- ``matrix``: ResNet-18/50, MobileNetV2/V3-Large, EfficientNet-B0, RegNetX-400MF, ShuffleNetV2 (random
  weights) through profile → channel prune → int8 integer → ONNX Runtime (tests/models/matrix.py: the
  same steps the tests run); per model per step in ``results.matrix``, a failure names its op;
- ``ort``: the zoo MobileNetV2 exported with the default IntegerConfig: how many of its convs ONNX
  Runtime runs as QLinearConv after its graph optimizations;
- ``kl``: logits SQNR of the KL observer minus min-max on the pretrained CIFAR ResNet-20 (20 CIFAR-10
  samples, calibrated on themselves), default config and reduce_range=False;
- ``latency``: int8 batch-1 latency after a first call at batch 8 ÷ after a first call at batch 1
  (zoo MobileNetV2, fast mode, interleaved rounds);
- ``bad_inputs``: the table-driven bad-input suite of tests/cli/bad_inputs.py, its own counts.

    python benchmarks/hardening.py                       # full: every part, 224×224 for the matrix
    python benchmarks/hardening.py --quick               # 32×32, JSON to a temporary file
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from efficientml.analysis.record import (REPO_ROOT, BenchmarkRecord, add_part_options, default_out, log, run_parts,
                                         selected_parts)

sys.path.insert(0, str(REPO_ROOT))  # tests/models/matrix.py and tests/cli/bad_inputs.py are shared with the tests


class State:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.rec = args, BenchmarkRecord("hardening")
        self.out = default_out("hardening", args.quick, args.out)
        self.rec.results["protocol"] = {"threads": args.threads, "quick": args.quick,
                                        "matrix_resolution": 32 if args.quick else 224, "weights": "random (seed 0)"}

    def save(self) -> None:
        self.rec.write(self.out)


def part_matrix(st: State) -> None:
    from tests.models.matrix import MODELS, passing, run_matrix

    res = 32 if st.args.quick else 224
    results = run_matrix(tuple(MODELS), resolution=res, batch=2 if not st.args.quick else 4)
    for name, steps in results.items():
        log(name, {s: ("ok" if r.get("ok") else r.get("error")) for s, r in steps.items()})
    st.rec.results["matrix"] = results
    n = passing(results)
    failing = {m: [s for s, r in steps.items() if not r.get("ok")] for m, steps in results.items()}
    st.rec.target("matrix_models_passing", n, "==", len(MODELS),
                  note=f"models whose every step (profile, prune, int8, onnx) passed, of {len(MODELS)} tried at "
                       f"{res}x{res}; failing steps: "
                       + ("; ".join(f"{m}: {', '.join(s)}" for m, s in failing.items() if s) or "none"))
    st.save()


def part_ort(st: State) -> None:
    from efficientml.models import build_model
    from efficientml.quant import IntegerConfig, convert_integer
    from efficientml.quant.export import export_onnx, ort_kernel_counts

    torch.manual_seed(2)
    model = build_model("mobilenetv2", num_classes=100).eval()
    rows = {}
    for res in ((32,) if st.args.quick else (32, 224)):
        x = torch.randn(4, 3, res, res)
        im = convert_integer(model, [x], IntegerConfig())
        with tempfile.TemporaryDirectory() as td:
            counts = ort_kernel_counts(export_onnx(im, Path(td) / "mbv2.onnx", x[:1]))
        rows[f"{res}px"] = counts
        log("ort", res, counts["qlinearconv"], "/", counts["convs"])
    st.rec.results["ort_mobilenetv2_default_export"] = rows
    frac = min(r["qlinearconv_fraction"] for r in rows.values())
    st.rec.target("ort_int8_qlinearconv_fraction", frac, "==", 1.0,
                  note="QLinearConv nodes in ORT's optimized graph / Conv nodes exported, zoo MobileNetV2, "
                       "default IntegerConfig (7-bit weights, 8-bit activations); min over resolutions")
    st.save()


def part_kl(st: State) -> None:
    from efficientml.analysis.metrics import sqnr
    from efficientml.data.cifar_samples import load_cifar_samples
    from efficientml.models import build_model
    from efficientml.models.resnet_cifar import PRETRAINED_MEAN, PRETRAINED_STD
    from efficientml.quant import IntegerConfig, convert_integer

    model = build_model("resnet20", pretrained=True).eval()
    x, _ = load_cifar_samples(normalize=True, mean=PRETRAINED_MEAN, std=PRETRAINED_STD)
    with torch.no_grad():
        ref = model(x)
    rows = {}
    for rr in (True, False):
        for obs in ("minmax", "kl"):
            im = convert_integer(model, [x], IntegerConfig(observer=obs, reduce_range=rr))
            with torch.no_grad():
                out = im(x)
            rows[f"{obs}_{'default' if rr else 'reduce_range_false'}"] = {
                "sqnr_db": float(sqnr(ref, out)), "agreement": int((out.argmax(1) == ref.argmax(1)).sum())}
    st.rec.results["kl_observer_resnet20"] = rows
    diff = min(rows[f"kl_{k}"]["sqnr_db"] - rows[f"minmax_{k}"]["sqnr_db"] for k in ("default", "reduce_range_false"))
    st.rec.target("kl_observer_sqnr_vs_minmax_db", diff, ">=", -1.0,
                  note="KL minus min-max logits SQNR (dB), pretrained CIFAR ResNet-20, 20 samples; worst of the "
                       "two reduce_range settings")
    st.save()


def part_latency(st: State) -> None:
    from efficientml.models import build_model
    from efficientml.quant import IntegerConfig, convert_integer
    from efficientml.quant.int8_speed import first_call_batch_latency_ratio

    torch.manual_seed(2)
    model = build_model("mobilenetv2", num_classes=100).eval()
    x = torch.randn(8, 3, 32, 32)
    im = convert_integer(model, [x], IntegerConfig())
    ratio = first_call_batch_latency_ratio(im, x, reps=5 if st.args.quick else 15, rounds=2 if st.args.quick else 5)
    st.rec.results["first_call_latency"] = {"model": "zoo mobilenetv2 (100 classes), 32x32", "ratio": ratio,
                                            "quantized_engine": torch.backends.quantized.engine}
    st.rec.target("int8_first_call_batch_latency_ratio", ratio, "<=", 1.1,
                  note="batch-1 fast-mode latency after a first call at batch 8 / after a first call at batch 1 "
                       "(best of interleaved rounds); on this CPU's kernels (see results.first_call_latency)")
    st.save()


def part_bad_inputs(st: State) -> None:
    from tests.cli.bad_inputs import summary

    s = summary()
    st.rec.results["bad_inputs"] = s
    log("bad inputs", {k: v for k, v in s.items() if k != "failing"})
    st.rec.target("bad_input_cases", s["bad_input_cases"], ">=", 150, note="cases in tests/cli/bad_inputs.py CASES")
    st.rec.target("bad_input_tracebacks", s["bad_input_tracebacks"], "==", 0, note="cases that printed a traceback")
    st.rec.target("bad_input_files_lost", s["bad_input_files_lost"], "==", 0,
                  note="cases after which an existing file was changed or removed")
    st.save()


PARTS = {"matrix": part_matrix, "ort": part_ort, "kl": part_kl, "latency": part_latency,
         "bad_inputs": part_bad_inputs}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_part_options(ap, PARTS, merge=False)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    st = State(args)
    run_parts(PARTS, selected_parts(PARTS, args.parts), st)
    st.save()
    log("wrote", st.out)


if __name__ == "__main__":
    main()
