"""``efficientml demo``: the main job on the built-in default.

Profiles the pretrained CIFAR ResNet-20 (weights © Yerlan Idelbayev, BSD-2-Clause — see
efficientml/models/NOTICE-resnet-cifar10.txt), classifies the 20 CIFAR-10 sample images, and measures
its CPU latency. Later stages of the pipeline (prune → quantize → int8 engine) extend this report.
"""

from __future__ import annotations

import argparse

from efficientml.cli.common import add_json_flag, positive_int, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="profile and evaluate the pretrained ResNet-20 (the default job)",
                       description="Profile the pretrained CIFAR-10 ResNet-20 (params, MACs, peak "
                                   "activation memory, latency) and classify the 20 CIFAR samples.")
    p.add_argument("--model", default="resnet20", help="pretrained CIFAR ResNet: resnet20/32/44/56")
    p.add_argument("--threads", type=positive_int, default=2, help="CPU threads for latency")
    p.add_argument("--runs", type=positive_int, default=30, help="timed runs for latency")
    p.add_argument("--markdown", action="store_true", help="print the report as Markdown")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
