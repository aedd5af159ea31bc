"""The model matrix: standard architectures we did not design, each run through the CNN path.

    results = run_matrix(("resnet18", "shufflenetv2"), resolution=32)   # {model: {step: {...}}}

Steps per model (random weights; BatchNorm at its initial statistics):

- ``profile``: parameters and MACs at 224×224 with 1000 classes (efficientml.analysis.profile),
  against the published figure (within 2%) and this project's exact count (``MACS_224``);
- ``prune``: channel pruning (``on_unsupported="skip"``, ops it cannot follow listed): ratio 0 gives
  equal outputs, ratio 0.3 is physically smaller and runs;
- ``int8``: integer conversion, strict first (an op without an integer step is named), then with
  ``skip_unsupported`` so the rest is still measured: SQNR vs fp32 on the calibration batch ≥ 20 dB;
- ``onnx``: QDQ export run by ONNX Runtime (optimized graph saved): how many convs became
  QLinearConv and how many stayed float; passes when every conv is integer and ORT's output is
  within the int8 bar of fp32 (its agreement with our integer model is recorded too).

A step's record holds ``ok`` and its numbers, or ``error``: one line naming the op that failed.
Used by tests/models/test_matrix.py and benchmarks/hardening.py.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from efficientml.analysis.metrics import sqnr
from efficientml.analysis.profile import profile
from efficientml.core.errors import EfficientMLError
from efficientml.models import build_model
from efficientml.prune import PruneConfig, prune
from efficientml.quant import IntegerConfig, convert_integer

# name → (torchvision's parameter count at 1000 classes, published MACs, our exact MACs at 224×224)
MODELS: dict[str, tuple[int, float, int]] = {
    "resnet18": (11_689_512, 1.82e9, 1_814_073_344),
    "resnet50": (25_557_032, 4.11e9, 4_089_184_256),
    "mobilenetv2": (3_504_872, 300e6, 300_774_272),
    "mobilenetv3_large": (5_483_032, 217e6, 216_589_760),
    "efficientnet_b0": (5_288_548, 390e6, 385_814_752),
    "regnet_x_400mf": (5_495_976, 0.41e9, 413_812_608),
    "shufflenetv2": (2_278_604, 146e6, 144_907_992),
}
SQNR_MIN_DB = 20.0
PRUNE_RATIO = 0.3
MATRIX_INT8: dict[str, Any] = {}       # IntegerConfig as a new user gets it (the defaults)


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def step_profile(name: str, **_: Any) -> dict[str, Any]:
    params, published, exact = MODELS[name]
    p = profile(build_model(name).eval(), (1, 3, 224, 224))
    rel = abs(p.macs - published) / published
    return {"ok": p.params == params and p.macs == exact and rel <= 0.02, "params": p.params,
            "params_published": params, "macs": p.macs, "macs_published": published,
            "macs_rel_diff": round(rel, 4), "peak_activation_elements": p.peak_activation_elements}


def step_prune(name: str, model: torch.nn.Module, x: torch.Tensor, **_: Any) -> dict[str, Any]:
    cfg = PruneConfig(method="channel", sparsity=0.0, on_unsupported="skip")
    same = prune(model, cfg, example_inputs=x).model
    res = prune(model, cfg.replace(sparsity=PRUNE_RATIO), example_inputs=x)
    with torch.no_grad():
        ref, out0, out = model(x), same(x), res.model(x)
    equal0 = torch.equal(ref, out0)
    smaller = _params(res.model) < _params(model)
    return {"ok": equal0 and smaller and out.shape == ref.shape and bool(torch.isfinite(out).all()),
            "equal_at_ratio_0": equal0, "params_before": _params(model),
            "params_after": _params(res.model), "ratio": PRUNE_RATIO, "skipped_ops": len(res.skipped),
            "skipped_examples": res.skipped[:3]}


def convert(model: torch.nn.Module, x: torch.Tensor) -> tuple[Any, str | None]:
    """The integer model (strict, else with float fallbacks) and the strict conversion's error."""
    try:
        return convert_integer(model, [x], IntegerConfig(**MATRIX_INT8)), None
    except EfficientMLError as e:
        strict = _line(e)
    return convert_integer(model, [x], IntegerConfig(skip_unsupported=True, **MATRIX_INT8)), strict


def step_int8(name: str, model: torch.nn.Module, x: torch.Tensor, state: dict, **_: Any) -> dict[str, Any]:
    im, strict = convert(model, x)
    state["int8"] = im
    with torch.no_grad():
        db = sqnr(model(x), im(x))
    floats = im.report()["float_layers"]
    rec = {"ok": strict is None and db >= SQNR_MIN_DB, "sqnr_db": round(db, 2),
           "float_layers": len(floats), "float_examples": floats[:4]}
    if strict is not None:
        rec["error"] = strict
    return rec


def ort_op_counts(path: Path, x: torch.Tensor) -> tuple[dict[str, int], torch.Tensor]:
    """Run ``path`` in ORT (all optimizations, one thread); op-type counts of the optimized graph."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    counts: dict[str, int] = {}
    for node in onnx.load(opts.optimized_model_filepath).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts, out


def conv_counts(counts: dict[str, int]) -> tuple[int, int]:
    """(integer convs, float convs) among ORT's optimized op types."""
    qconv = sum(n for op, n in counts.items() if "QLinearConv" in op)
    fconv = sum(n for op, n in counts.items() if op.endswith("Conv") and "QLinear" not in op)
    return qconv, fconv


def step_onnx(name: str, model: torch.nn.Module, x: torch.Tensor, state: dict, **_: Any) -> dict[str, Any]:
    from efficientml.quant.export import export_onnx

    im = state.get("int8") or convert(model, x)[0]
    with tempfile.TemporaryDirectory() as d:
        try:
            path = export_onnx(im, Path(d) / f"{name}.onnx", x[:1])
        except EfficientMLError as e:
            floats = im.report()["float_layers"]
            ops = sorted({f.rsplit("(", 1)[-1].rstrip(")") for f in floats})
            suffix = f" (float-only ops in this model: {', '.join(ops)})" if ops else ""
            return {"ok": False, "error": _line(e) + suffix}
        counts, out = ort_op_counts(path, x)
    qconv, fconv = conv_counts(counts)
    with torch.no_grad():
        ref = im(x)
        fp32 = model(x)
    db, agree = sqnr(fp32, out), sqnr(ref, out)
    frac = qconv / max(1, qconv + fconv)
    rec = {"ok": fconv == 0 and qconv > 0 and db >= SQNR_MIN_DB, "qlinearconv": qconv, "float_conv": fconv,
           "qlinearconv_fraction": round(frac, 4), "ort_vs_fp32_sqnr_db": round(db, 2),
           "ort_vs_integer_sqnr_db": round(agree, 2) if math.isfinite(agree) else "inf"}
    if fconv:
        rec["error"] = (f"ORT kept {fconv} of {qconv + fconv} convs in float (Conv/FusedConv): the exported "
                        f"QDQ pattern around them was not fused into QLinearConv")
    elif not rec["ok"]:
        rec["error"] = f"ORT output is {db:.1f} dB from fp32, under the {SQNR_MIN_DB:.0f} dB bar"
    return rec


STEPS: dict[str, Callable[..., dict[str, Any]]] = {
    "profile": step_profile, "prune": step_prune, "int8": step_int8, "onnx": step_onnx}


def run_model(name: str, resolution: int = 32, batch: int = 4, steps: tuple[str, ...] = tuple(STEPS),
              seed: int = 0) -> dict[str, dict[str, Any]]:
    """Every step of the matrix for one model; a step that raises is recorded with its error."""
    torch.manual_seed(seed)
    model = build_model(name).eval()
    x = torch.randn(batch, 3, resolution, resolution)
    state: dict[str, Any] = {}
    out: dict[str, dict[str, Any]] = {}
    for step in steps:
        try:
            out[step] = STEPS[step](name=name, model=model, x=x, state=state)
        except Exception as e:  # noqa: BLE001 - the matrix records every failure, naming the op
            out[step] = {"ok": False, "error": _line(e)}
        for k, v in out[step].items():
            if isinstance(v, float) and not math.isfinite(v):
                out[step][k] = None
    return out


def run_matrix(names: tuple[str, ...] = tuple(MODELS), **kw: Any) -> dict[str, dict[str, dict[str, Any]]]:
    return {n: run_model(n, **kw) for n in names}


def passing(results: dict[str, dict[str, dict[str, Any]]]) -> int:
    """Models whose every step passed."""
    return sum(all(s.get("ok") for s in steps.values()) for steps in results.values())
