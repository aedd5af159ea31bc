"""Baselines: the zoo models trained on Fashion-MNIST — accuracy, params, MACs, peak activation
memory and measured CPU latency (batch 1 and 64, 2 threads). These checkpoints are what the pruning
and quantization benchmarks compress.

    python benchmarks/baselines.py            # load checkpoints/…, train the missing ones, write JSON
    python benchmarks/baselines.py --quick    # tiny smoke run (CI/tests): small subsets, no JSON

Each checkpoint records how it was trained (the exact `efficientml train` recipe); a missing one is
trained here with the same recipe, so `python benchmarks/baselines.py` reproduces everything.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from efficientml.analysis import measure_latency, profile
from efficientml.analysis.record import REPO_ROOT as ROOT, BenchmarkRecord, log
from efficientml.data import fashion_mnist_loaders
from efficientml.models import build_model
from efficientml.train import TrainConfig, evaluate, fit, load_checkpoint, save_checkpoint

# name → (model kwargs, training recipe). The VGG is the course VGG at width 0.25 (16…128 channels):
# the full-width VGG (606M MACs) does not train in reasonable time on 2 CPU cores.
RECIPES = {
    "vgg": ({"width": 0.25}, {"epochs": 15, "lr": 0.1}),
    "resnet20": ({}, {"epochs": 6, "lr": 0.1}),
    "mobilenetv2": ({"width": 0.5, "cifar_stem": True}, {"epochs": 1, "lr": 0.05}),
    "small_cnn": ({}, {"epochs": 4, "lr": 0.05}),
}


def checkpoint_path(name: str) -> Path:
    return ROOT / "checkpoints" / f"{name}_fmnist.safetensors"


def train_baseline(name: str, out: Path, quick: bool = False):
    kwargs, recipe = RECIPES[name]
    kwargs = {"num_classes": 10, "in_channels": 1, **kwargs}
    cfg = TrainConfig(epochs=0.02 if quick else recipe["epochs"], lr=recipe["lr"])
    train, test = fashion_mnist_loaders(batch_size=128, augment=True,
                                        test_subset=512 if quick else None)
    model = build_model(name, **kwargs)
    hist = fit(model, train, cfg, eval_loader=test)
    args = " ".join(f"--model-arg {k}={v}" for k, v in RECIPES[name][0].items())
    meta = {"model": name, "model_kwargs": kwargs, "dataset": "fashion-mnist", "pad_to": None,
            "train_config": cfg.to_dict(), "batch_size": 128, "augment": True,
            "history": hist.epochs, "test_accuracy": hist.epochs[-1]["eval_accuracy"],
            "command": (f"efficientml train {name} --dataset fashion-mnist --epochs {recipe['epochs']} "
                        f"--lr {recipe['lr']} {args}").strip()}
    if not quick:
        save_checkpoint(out, model, meta)
    return model, meta


def measure(name: str, model, meta: dict, ck: Path, source: str, test, quick: bool, threads: int) -> dict:
    """One model's row: accuracy, cost (params, MACs, peak activations) and measured latency."""
    model.eval()
    acc = evaluate(model, test)["accuracy"]
    prof = profile(model, (1, 1, 28, 28), name=name)
    runs = 3 if quick else 30
    lat1 = measure_latency(model, torch.randn(1, 1, 28, 28), warmup=5, runs=runs, threads=threads)
    lat64 = measure_latency(model, torch.randn(64, 1, 28, 28), warmup=3, runs=max(3, runs // 2),
                            threads=threads)
    row = {
        "test_accuracy": round(acc, 2), "params": prof.params, "macs": prof.macs,
        "peak_activation_bytes_fp32": prof.peak_activation_bytes(32),
        "peak_activation_bytes_int8": prof.peak_activation_bytes(8),
        "size_bytes_fp32": prof.size_bytes["fp32"],
        "latency_ms_bs1": lat1.to_dict(), "latency_ms_bs64": lat64.to_dict(),
        "latency_kind": "measured",
        "checkpoint": str(ck.relative_to(ROOT)), "source": source,
        "model_kwargs": meta.get("model_kwargs"), "how_trained": {
            "command": meta.get("command"), "train_config": meta.get("train_config"),
            "epochs": [{k: round(v, 4) if isinstance(v, float) else v for k, v in e.items()}
                       for e in meta.get("history", [])]},
    }
    print(f"{name:12s} acc {acc:6.2f}%  params {prof.params:>9,}  MACs {prof.macs:>12,}  "
          f"peak act {prof.peak_activation_bytes(32) / 1024:.1f} KiB  "
          f"bs1 {lat1.median_ms:.2f} ms  bs64 {lat64.median_ms:.2f} ms", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run on tiny subsets; JSON only with --out")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/baselines.json)")
    ap.add_argument("--models", nargs="*", default=list(RECIPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-train", action="store_true",
                    help="report a model without a checkpoint as not measured instead of training it")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rec = BenchmarkRecord("baselines")
    _, test = fashion_mnist_loaders(batch_size=512, augment=False,
                                    test_subset=512 if args.quick else None)
    rows, missing = {}, []
    for name in args.models:
        ck = checkpoint_path(name)
        if args.no_train and not ck.is_file():
            missing.append(name)
            continue
        if ck.is_file() and not args.quick:
            model, meta = load_checkpoint(ck)
            source = "loaded checkpoint"
        else:
            log(f"training {name} ({'quick' if args.quick else 'full recipe'}) …")
            model, meta = train_baseline(name, ck, quick=args.quick)
            source = "trained in this run"
        rows[name] = measure(name, model, meta, ck, source, test, args.quick, args.threads)
    rec.results = {"dataset": "Fashion-MNIST test (10,000 images, 28×28, no padding)",
                   "input_shape": [1, 1, 28, 28], "threads": args.threads, "models": rows}
    if "vgg" in rows:
        rec.target("vgg_fmnist_accuracy", rows["vgg"]["test_accuracy"], ">=", 93.0,
                   note="course VGG at width 0.25, test accuracy in percent")
    for name, r in rows.items():
        if name != "vgg":
            rec.target(f"{name}_fmnist_accuracy", r["test_accuracy"], ">=", 0.0,
                       note="reported only; no threshold of its own")
    for name in missing:
        rec.target(f"{name}_fmnist_accuracy", None, ">=", 0.0,
                   note=f"not measured: no checkpoint {checkpoint_path(name).name} (run without --no-train "
                        "to train it with the recipe above)")
    if args.quick and not args.out:
        print("quick mode: no JSON written (--out to write one)")
        return
    print(f"wrote {rec.write(args.out)}")


if __name__ == "__main__":
    main()
