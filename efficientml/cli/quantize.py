"""``efficientml quantize CHECKPOINT --method int8|weight|kmeans``: quantize a trained checkpoint,
evaluate it next to the float model and (optionally) write the result."""

from __future__ import annotations

import argparse

from efficientml.cli.common import (add_json_flag, add_overwrite_flag, console, flag_names, model_args,
                                    parse_model_args, positive_int, print_json)
from efficientml.cli.model_source import MODEL_HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a checkpoint (int8 integer-only, weight-only formats, k-means)",
                       description="Quantize a trained checkpoint and compare its accuracy with fp32.")
    p.add_argument("checkpoint", help="a checkpoint written by 'efficientml train' or 'prune', or a plain state "
                                      "dict (.safetensors, .pt) with --model")
    p.add_argument("--model", default=None, help="architecture of a plain state dict: " + MODEL_HELP)
    model_args(p)
    p.add_argument("--method", choices=("int8", "weight", "kmeans"), default="int8")
    p.add_argument("--format", default="int4", help="number format for --method weight (see 'efficientml formats')")
    p.add_argument("--bits", type=positive_int, default=4, help="codebook bits for --method kmeans")
    p.add_argument("--observer", default="minmax", help="activation calibrator for int8: minmax, ema, percentile, mse, kl")
    p.add_argument("--calibration-batches", type=positive_int, default=8)
    p.add_argument("--eval-batches", type=positive_int, default=None, help="evaluate on this many test batches")
    p.add_argument("--skip-unsupported", action="store_true", help="keep layers without a quantized kernel in float")
    p.add_argument("--out", help="write the result: .onnx (int8 QDQ) or .safetensors (simulated weights)")
    add_overwrite_flag(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from efficientml.core.errors import ConfigError
    from efficientml.data import fashion_mnist_loaders
    from efficientml.core.transform import apply
    from efficientml.quant import IntegerConfig, KMeansConfig, WeightOnlyConfig
    from efficientml.train import evaluate, save_checkpoint

    with flag_names(observer="--observer", calibration_batches="--calibration-batches", format="--format",
                    skip_unsupported="--skip-unsupported", bits="--bits"):
        if args.method == "int8":
            cfg = IntegerConfig(observer=args.observer, calibration_batches=args.calibration_batches,
                                skip_unsupported=args.skip_unsupported)
        elif args.method == "weight":
            cfg = WeightOnlyConfig(format=args.format, skip_unsupported=args.skip_unsupported)
        else:
            cfg = KMeansConfig(bits=args.bits)
    _check_out(args)
    model, meta = _model(args)
    model.eval()
    if meta.get("dataset", "fashion-mnist") != "fashion-mnist":
        raise ConfigError(f"quantize evaluates on Fashion-MNIST; this checkpoint was trained on {meta['dataset']!r}")
    train, test = fashion_mnist_loaders(batch_size=64, augment=False, pad_to=meta.get("pad_to"))
    with flag_names(skip_unsupported="--skip-unsupported"):
        res = apply(model, cfg, calib=train)
    qmodel = res.model.with_mode("fast") if args.method == "int8" else res.model
    base = evaluate(model, test, max_batches=args.eval_batches)
    q = evaluate(qmodel, test, max_batches=args.eval_batches)
    out = {"method": args.method, "path": res.path, "config": cfg.to_dict(), "fp32_accuracy": base["accuracy"],
           "quantized_accuracy": q["accuracy"], "report": res.report}
    if args.out:
        if args.out.endswith(".onnx"):
            from efficientml.quant.export import export_onnx

            x0 = next(iter(test))[0][:1]
            export_onnx(res.model, args.out, x0)
        else:
            from efficientml.quant.kmeans import strip_kmeans

            save_checkpoint(args.out, strip_kmeans(qmodel), {**meta, "quantization": cfg.to_dict()})
        out["written"] = args.out
    if args.json:
        print_json(out)
    else:
        console().print(f"{args.method} ({res.path}): fp32 {base['accuracy']:.2f}% → quantized "
                        f"{q['accuracy']:.2f}%" + (f"; wrote {args.out}" if args.out else ""))
        if res.report.get("float_layers"):
            console().print(f"kept in float: {', '.join(res.report['float_layers'])}")
    return 0


def _check_out(args: argparse.Namespace) -> None:
    """Before any work: --out has the right extension for --method, is new (or --overwrite), writable."""
    from efficientml.core.errors import ConfigError
    from efficientml.core.outputs import check_output

    if not args.out:
        return
    if args.out.endswith(".onnx"):
        if args.method != "int8":
            raise ConfigError("ONNX export is for --method int8; use a .safetensors path for the others")
    elif args.out.endswith(".safetensors"):
        if args.method == "int8":
            raise ConfigError("an int8 integer model is written as ONNX; give --out a .onnx path")
        check_output(args.out + ".json", args.overwrite, flag="--out")
    else:
        raise ConfigError(f"--out {args.out!r} must end in .onnx (int8) or .safetensors (weight, kmeans)")
    check_output(args.out, args.overwrite, flag="--out")


def _model(args: argparse.Namespace):
    from efficientml.cli import model_source as ms

    src = ms.load_checkpoint(args.checkpoint, args.model, ms.kwargs_for(
        args.model, {"num_classes": 10, "in_channels": 1}, parse_model_args(args.model_arg)))
    ms.need_module(src, "quantized")
    ms.warn_not_finite(src.model, "the model")
    return src.model, src.meta
