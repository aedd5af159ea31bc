"""``efficientml demo``: the main job on the built-in default.

The default (``--model vgg``) runs the CNN pipeline end to end on the trained course VGG
(checkpoints/vgg_fmnist.safetensors, Fashion-MNIST): profile → channel prune + KD fine-tune → integer
int8 → the engine's generated C, compiled and checked bit-exact → one before/after report as a table,
Markdown and a plot, written with the C into ``--out`` (see :mod:`efficientml.cli.demo_pipeline`).

``--model resnet20`` (or 32/44/56) profiles the pretrained CIFAR ResNet instead (weights © Yerlan
Idelbayev, BSD-2-Clause — see efficientml/models/NOTICE-resnet-cifar10.txt), classifies the 20 CIFAR-10
sample images and measures its CPU latency.
"""

from __future__ import annotations

import argparse

from efficientml.cli.common import add_json_flag, add_overwrite_flag, fraction, positive_int, print_json

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the CNN pipeline end to end: profile, prune + KD, int8, engine C (default job)",
                       description="Run the trained Fashion-MNIST VGG through profile → channel prune + KD "
                                   "fine-tune → int8 → the engine's C code, and report params, size, MACs, peak "
                                   "memory, measured latency and accuracy of every stage (about 2 minutes on 2 "
                                   "cores). --model resnet20/32/44/56 profiles a pretrained CIFAR ResNet instead.")
    p.add_argument("--model", default="vgg", help="vgg (the pipeline, default) or a pretrained CIFAR ResNet to "
                                                  "profile: resnet20/32/44/56")
    p.add_argument("--out", default="efficientml-demo",
                   help="folder for the C code, report.json, report.md and pipeline.png (default ./efficientml-demo)")
    add_overwrite_flag(p, "the files of an earlier demo in --out")
    p.add_argument("--ratio", type=fraction, default=0.5, help="channels pruned per conv (default 0.5)")
    p.add_argument("--finetune-images", type=positive_int, default=12000,
                   help="training images the KD fine-tune sees (default 12000)")
    p.add_argument("--test-images", type=positive_int, default=10000,
                   help="Fashion-MNIST test images for the accuracies (default all 10000)")
    p.add_argument("--threads", type=positive_int, default=2, help="CPU threads for latency")
    p.add_argument("--runs", type=positive_int, default=30, help="timed runs for latency")
    p.add_argument("--markdown", action="store_true", help="print the report as Markdown")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.model != "vgg":
        return run_profile(args)
    from pathlib import Path

    from efficientml.cli.demo_pipeline import OUTPUTS, DemoConfig, run_demo
    from efficientml.cli.demo_report import plot, print_table, to_markdown
    from efficientml.core.errors import ConfigError
    from efficientml.core.serialization import atomic_path, write_json

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {args.out!r} is a file; expected a folder for the demo's outputs")
    clash = [n for n in OUTPUTS if (out / n).exists()]
    if clash and not args.overwrite:
        raise ConfigError(f"{out / clash[0]} already exists (from an earlier demo); pass --overwrite to replace "
                          "the demo's files there, or choose another --out")
    cfg = DemoConfig(ratio=args.ratio, finetune_images=args.finetune_images, test_images=args.test_images,
                     threads=args.threads, runs=args.runs)
    report = run_demo(out, cfg)
    report["plot"] = str(out / OUTPUTS[2])
    skipped = plot(report, out / OUTPUTS[2])
    if skipped:
        report["plot"] = f"skipped: {skipped}"
    md = to_markdown(report)
    with atomic_path(out / OUTPUTS[1]) as tmp:
        tmp.write_text(md)
    write_json(out / OUTPUTS[0], report)
    if args.json:
        print_json(report)
    elif args.markdown:
        print(md, end="")
    else:
        print_table(report)
        print(md.split("\n\n", 2)[2], end="")
        print(f"wrote {', '.join(str(out / n) for n in OUTPUTS if n != OUTPUTS[2] or not skipped)}")
    return 0


def run_profile(args: argparse.Namespace) -> int:
    import torch

    from efficientml.analysis import measure_latency, profile
    from efficientml.data.cifar_samples import CIFAR10_CLASSES, load_cifar_samples
    from efficientml.models import build_model
    from efficientml.models.resnet_cifar import PRETRAINED_MEAN, PRETRAINED_STD

    model = build_model(args.model, pretrained=True).eval()
    x, y = load_cifar_samples(normalize=True, mean=PRETRAINED_MEAN, std=PRETRAINED_STD)
    prof = profile(model, (1, 3, 32, 32), name=f"{args.model} (pretrained CIFAR-10)")
    with torch.inference_mode():
        pred = model(x).argmax(1)
    correct = int((pred == y).sum())
    lat1 = measure_latency(model, x[:1], warmup=5, runs=args.runs, threads=args.threads)
    lat20 = measure_latency(model, x, warmup=3, runs=max(5, args.runs // 3), threads=args.threads)
    report = {
        "model": args.model, "profile": prof.summary(),
        "cifar_samples": {"correct": correct, "total": len(y),
                          "predictions": [CIFAR10_CLASSES[i] for i in pred.tolist()],
                          "labels": [CIFAR10_CLASSES[i] for i in y.tolist()]},
        "latency_ms": {"batch1": lat1.to_dict(), "batch20": lat20.to_dict()},
        "measured": "latency measured on this machine (median of timed runs after warm-up)",
    }
    if args.json:
        print_json(report)
        return 0
    if args.markdown:
        print(prof.to_markdown(layers=False))
    else:
        prof.print(layers=False)
    print(f"\nCIFAR-10 samples: {correct}/{len(y)} correct")
    print(f"latency (measured, {lat1.threads} threads, {lat1.device}): batch 1 median "
          f"{lat1.median_ms:.2f} ms, batch 20 median {lat20.median_ms:.2f} ms")
    print("weights: Yerlan Idelbayev, BSD-2-Clause (efficientml/models/NOTICE-resnet-cifar10.txt)")
    return 0
