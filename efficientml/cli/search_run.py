"""The training and searching actions of ``efficientml search`` (see :mod:`efficientml.cli.search`).

Data: Fashion-MNIST's training split cut by a fixed permutation (seed 0) into 5,000 *validation*
images (the searches' scores) and the rest for training the supernet and re-calibrating BatchNorm; the
test split is left for the user's final evaluation (``efficientml eval`` on the extracted checkpoint).
The supernet checkpoint holds its space, width and training history in its metadata.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from efficientml.cli.common import print_json

VAL_IMAGES = 5000
SUPERNET_KIND = "ofa_supernet"


def _splits(train_images: int | None = None):
    from efficientml.data.fashion_mnist import load_fashion_mnist
    from efficientml.data.loader import ImageTensors

    full = load_fashion_mnist("train")
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))

    def part(idx: torch.Tensor) -> ImageTensors:
        return ImageTensors(full.images[idx], full.labels[idx], full.mean, full.std, full.classes)

    rest = perm[VAL_IMAGES:]
    return part(rest[:train_images] if train_images else rest), part(perm[:VAL_IMAGES])


def _calib(train) -> list[torch.Tensor]:
    from efficientml.data.loader import TensorLoader

    return [x for _, (x, _) in zip(range(10), TensorLoader(train, 128, shuffle=True, seed=1))]


def _check_out(path: str, overwrite: bool, suffix: str, extra: str) -> Path:
    from efficientml.core.errors import ConfigError
    from efficientml.core.outputs import check_output

    out = Path(path)
    if out.suffix != suffix:
        raise ConfigError(f"--out {str(out)!r} must end in {suffix}")
    for p in (out, out.with_suffix(out.suffix + extra)):
        check_output(p, overwrite, flag="--out")
    return out


def parse_arch(spec: str, space: Any):
    """ARCH (module docstring) → a canonical Arch of ``space``; a bad one is one ConfigError sentence."""
    import random

    from efficientml.core.errors import ConfigError
    from efficientml.nas.space import Arch

    if spec in ("largest", "smallest"):
        return getattr(space, spec)()
    if spec.startswith("random:"):
        try:
            return space.sample(random.Random(int(spec[7:])))
        except ValueError:
            raise ConfigError(f"ARCH {spec!r}: random:SEED needs an integer seed") from None
    text = Path(spec).read_text() if not spec.lstrip().startswith("{") and Path(spec).is_file() else spec
    try:
        d = json.loads(text)
    except json.JSONDecodeError:
        raise ConfigError(f"ARCH {spec!r} is neither largest, smallest, random:SEED, a JSON file nor JSON "
                          "text") from None
    if isinstance(d, dict) and isinstance(d.get("best"), dict):  # a search history
        d = d["best"]["arch"]
    if not isinstance(d, dict):
        raise ConfigError(f"ARCH {spec!r} is not a JSON object naming an architecture")
    try:
        arch = Arch.from_dict(d)
    except TypeError as e:
        raise ConfigError(f"ARCH {spec!r} lacks a field of an architecture ({e})") from None
    space.check(arch)
    return space.canonical(arch)


def run_train(args: argparse.Namespace) -> int:
    from efficientml.core.errors import ConfigError
    from efficientml.data.loader import TensorLoader
    from efficientml.nas.ofa import OFANet
    from efficientml.nas.ofa_train import ShrinkConfig, progressive_shrink
    from efficientml.nas.space import MBSpace
    from efficientml.train.checkpoint import save_checkpoint

    out = _check_out(args.out, args.overwrite, ".safetensors", ".json")
    try:
        epochs = tuple(float(e) for e in args.epochs.split(","))
    except ValueError:
        raise ConfigError(f"--epochs {args.epochs!r} must be four comma-separated numbers (full,kernel,depth,width)") \
            from None
    if len(epochs) != 4 or min(epochs) <= 0:
        raise ConfigError(f"--epochs {args.epochs!r} needs four positive numbers, one per phase "
                          "(full,kernel,depth,width)")
    cfg = ShrinkConfig(epochs=epochs, seed=int(args.seed))
    train, _ = _splits(args.train_images)
    space = MBSpace()
    net = OFANet(space)
    hist = progressive_shrink(net, TensorLoader(train, 128, shuffle=True, augment=True, seed=int(args.seed)), cfg,
                              log=None if args.json else print)
    meta = {"kind": SUPERNET_KIND, "space": space.to_dict(), "width": net.width, "train_images": len(train),
            "history": hist}
    save_checkpoint(out, net, meta)
    secs = sum(p["seconds"] for p in hist["phases"])
    if args.json:
        print_json({"out": str(out), "seconds": secs, "history": hist})
    else:
        print(f"trained the supernet ({', '.join(p['phase'] for p in hist['phases'])}) in {secs:.0f} s; saved {out}")
    return 0


def load_supernet(path: str):
    from efficientml.core.errors import CheckpointError
    from efficientml.core.paths import require_file
    from efficientml.core.serialization import load_state_dict
    from efficientml.nas.ofa import OFANet
    from efficientml.nas.space import MBSpace
    from efficientml.train.checkpoint import read_checkpoint_meta

    p = require_file(path, "supernet checkpoint")
    meta = read_checkpoint_meta(p)
    if meta.get("kind") != SUPERNET_KIND:
        raise CheckpointError(f"{path!r} is not a supernet checkpoint (made by 'efficientml search train')")
    net = OFANet(MBSpace.from_dict(meta["space"]), meta["width"])
    missing, unexpected = net.load_state_dict(load_state_dict(p), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path!r} does not fit its supernet: missing {list(missing)[:3]}, "
                              f"unexpected {list(unexpected)[:3]}")
    return net.eval(), meta


def run_search(args: argparse.Namespace) -> int:
    from efficientml.core.errors import ConfigError
    from efficientml.core.outputs import check_output
    from efficientml.data.loader import TensorLoader
    from efficientml.nas.latency import LatencyTable
    from efficientml.nas.ofa_train import evaluate_subnet
    from efficientml.nas.search import STRATEGIES, Constraints

    out = Path(args.out)
    if out.suffix != ".json":
        raise ConfigError(f"--out {str(out)!r} must end in .json (the search history)")
    for p in (out, out.with_suffix(".png")):
        check_output(p, args.overwrite, flag="--out")
    if args.max_latency_ms is not None and args.lut is None:
        raise ConfigError("--max-latency-ms needs --lut FILE (a table from 'efficientml search build-lut')")
    net, _ = load_supernet(args.supernet)
    lut = LatencyTable.load(args.lut) if args.lut else None
    if lut is not None and lut.space != net.space:
        raise ConfigError(f"--lut {args.lut!r} was measured for another search space than the supernet's")
    train, val = _splits()
    val = val.subset(args.val_images, 0) if args.val_images < len(val) else val
    calib, loader = _calib(train), TensorLoader(val, 500)
    cons = Constraints(max_macs=None if args.max_macs is None else int(args.max_macs),
                       max_params=None if args.max_params is None else int(args.max_params),
                       max_peak_bytes=None if args.sram is None else args.sram * 1024,
                       max_latency_ms=args.max_latency_ms)
    hist = STRATEGIES[args.strategy](net.space, lambda a: evaluate_subnet(net, a, calib, loader)[0], args.budget,
                                     cons, latency=lut, seed=int(args.seed))
    hist.write(out)
    best: dict[str, Any] = hist.best or {}
    if args.json:
        print_json({"out": str(out), "evaluations": len(hist.records), "best": best})
    else:
        print(f"{args.strategy}: {len(hist.records)} architectures; best {best.get('key')} at "
              f"{best.get('score', float('nan')):.2f}% validation accuracy; wrote {out} and {out.with_suffix('.png')}")
    return 0


def run_extract(args: argparse.Namespace) -> int:
    from efficientml.nas.costs import subnet_cost
    from efficientml.nas.ofa import recalibrate_bn
    from efficientml.nas.subnet import subnet_kwargs
    from efficientml.train.checkpoint import save_checkpoint

    out = _check_out(args.out, args.overwrite, ".safetensors", ".json")
    net, _ = load_supernet(args.supernet)
    arch = parse_arch(args.arch, net.space)
    train, _ = _splits()
    sub = recalibrate_bn(net.extract(arch), _calib(train), arch.resolution)
    meta = {"model": "mbnet", "model_kwargs": subnet_kwargs(net.space, arch), "dataset": "fashion_mnist",
            "resolution": arch.resolution, "arch": arch.to_dict(), "from_supernet": str(args.supernet)}
    save_checkpoint(out, sub, meta)
    c = subnet_cost(net.space, arch).to_dict()
    if args.json:
        print_json({"out": str(out), "arch": arch.to_dict(), **c})
    else:
        print(f"{arch.key()}: {c['params']:,} params, {c['macs'] / 1e6:.2f} M MACs; BN re-calibrated; saved {out}")
    return 0
