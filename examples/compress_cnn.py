"""Compress a CNN end to end: profile → channel prune → int8 → evaluate.

On the pretrained CIFAR ResNet-20 and the 20 CIFAR-10 test samples that ship with the data:

    python examples/compress_cnn.py                # 30% of the channels of every prunable group
    python examples/compress_cnn.py --ratio 0.5

Channel pruning here is physical (the layers get narrower: fewer MACs and parameters, counted by
efficientml.analysis); int8 is real (integer weights, PyTorch's int8 kernels). Without fine-tuning,
accuracy falls with the ratio: a real run fine-tunes between the two steps (efficientml.train.fit).
"""

from __future__ import annotations

import argparse

import torch

from efficientml.analysis import profile
from efficientml.data.cifar_samples import load_cifar_samples
from efficientml.models import build_model
from efficientml.models.resnet_cifar import PRETRAINED_MEAN, PRETRAINED_STD
from efficientml import apply
from efficientml.prune import PruneConfig, recalibrate_bn
from efficientml.quant import IntegerConfig


def top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Correctly classified samples out of len(y)."""
    with torch.no_grad():
        return int((model(x).argmax(1) == y).sum())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.3, help="share of channels removed per group")
    args = ap.parse_args(argv)

    model = build_model("resnet20", pretrained=True).eval()
    x, y = load_cifar_samples(normalize=True, mean=PRETRAINED_MEAN, std=PRETRAINED_STD)  # (20, 3, 32, 32)
    before = profile(model, (1, 3, 32, 32), name="resnet20")

    # 1. channel pruning: L2 norm of each channel, residual streams pruned together, layers shrunk
    pruned = apply(model, PruneConfig(method="channel", sparsity=args.ratio, criterion="l2"),
                   example_inputs=x[:2]).model
    recalibrate_bn(pruned, [(x, y)])  # BatchNorm statistics of the narrower network
    after = profile(pruned, (1, 3, 32, 32), name="resnet20-pruned")

    # 2. int8: per-channel weights, BN folded, activation ranges from the calibration batch
    int8 = apply(pruned, IntegerConfig(observer="minmax"), calib=[x]).model

    row = {"params": (before.params, after.params), "macs": (before.macs, after.macs),
           "correct_of_20": {"fp32": top1(model, x, y), "pruned": top1(pruned, x, y), "pruned_int8": top1(int8, x, y)},
           "int8_weight_bytes": int8.size_bytes(), "pruned_fp32_bytes": int(after.size_bytes["fp32"])}
    print(f"params {before.params:,} → {after.params:,}   MACs {before.macs:,} → {after.macs:,}")
    print(f"weights {row['pruned_fp32_bytes']:,} B fp32 → {row['int8_weight_bytes']:,} B int8")
    print("correct of 20:", row["correct_of_20"])
    return row


if __name__ == "__main__":
    main()
