"""``efficientml profile MODEL``: parameters, size, MACs, peak activation memory, receptive field and
(optionally) latency of a zoo model, as tables, JSON or Markdown."""

from __future__ import annotations

import argparse
import sys

from efficientml.cli.common import add_json_flag, check_input_shape, number, parse_model_args, positive_int, print_json
from efficientml.cli.model_source import MODEL_HELP

IMAGENET_MODELS = {"resnet18", "resnet34", "resnet50", "mobilenetv2"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="cost of a zoo model: params, size, MACs, memory, latency",
                       description="Profile a zoo model with one traced forward pass: parameters, "
                                   "size, MACs per layer, peak activation memory (fp32/int8), "
                                   "receptive field, and latency with --latency.")
    p.add_argument("model", nargs="?", help=MODEL_HELP + "; optional with an efficientml --checkpoint")
    p.add_argument("--input-shape", default=None, metavar="N,C,H,W",
                   help="input shape, e.g. 1,3,32,32 (default: 224×224 for ImageNet models, "
                        "32×32 otherwise, channels from the first layer)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for the model builder (repeatable), e.g. width=0.5")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="load weights: an efficientml checkpoint (it names its model; pruned ones too) or a "
                        "plain state dict (.safetensors, .pt) for MODEL")
    p.add_argument("--latency", action="store_true", help="also measure latency")
    p.add_argument("--warmup", type=number("a non-negative integer", 0, 10_000, integer=True), default=10,
                   help="latency warm-up runs (default 10)")
    p.add_argument("--runs", type=positive_int, default=50, help="timed latency runs (default 50)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--sparse-format", default="dense", choices=("dense", "csr", "bitmask", "relative"),
                   help="also report the size of nonzero weights in this format")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables")
    p.add_argument("--no-layers", action="store_true", help="print the summary only")
    p.add_argument("--list", action="store_true", help="list the zoo models and exit")
    add_json_flag(p)
    p.set_defaults(func=run)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` (or ``1x3x32x32``) → ``(1, 3, 32, 32)``."""
    from efficientml.core.errors import ShapeError

    parts = [s for s in text.replace("x", ",").replace("×", ",").split(",") if s.strip()]
    try:
        shape = tuple(int(s) for s in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise ShapeError(f"--input-shape must be positive integers separated by commas, "
                         f"e.g. 1,3,32,32, got {text!r}")
    check_input_shape(shape)
    return shape


def default_shape(name: str | None, model) -> tuple[int, ...]:
    """One image at the resolution the model is known for, channels from its first layer."""
    import torch.nn as nn

    from efficientml.core.errors import ShapeError

    size = 224 if name in IMAGENET_MODELS else 32
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return (1, m.in_channels, size, size)
        if isinstance(m, nn.Linear):
            return (1, m.in_features)
    raise ShapeError("cannot guess this model's input shape; pass --input-shape, e.g. 1,3,32,32")


def _check_rank(model, shape: tuple[int, ...]) -> None:
    """A model whose first layer is a Conv2d takes N,C,H,W: say so instead of failing deep inside."""
    import torch.nn as nn

    from efficientml.core.errors import ShapeError

    first = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))), None)
    need = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}.get(type(first))
    if need is not None and len(shape) != need:
        dims = {3: "N,C,L", 4: "N,C,H,W", 5: "N,C,D,H,W"}[need]
        raise ShapeError(f"--input-shape {','.join(map(str, shape))} has {len(shape)} dimensions; this model's first "
                         f"layer is a {type(first).__name__}, which takes {need} ({dims}, e.g. 1,{first.in_channels},"
                         f"{','.join(['32'] * (need - 2))})")


def run(args: argparse.Namespace) -> int:
    import torch

    from efficientml.analysis import profile
    from efficientml.core.errors import ConfigError, ShapeError
    from efficientml.models import list_models

    if args.list:
        print("\n".join(list_models()))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    from efficientml.cli import model_source as ms

    name = args.model
    if name is None and args.checkpoint is None:
        raise ConfigError("give a model (zoo name, see 'efficientml profile --list'; file.py:Name; .pt2) "
                          "or --checkpoint")
    shape = parse_shape(args.input_shape) if args.input_shape else None
    kwargs = parse_model_args(args.model_arg)
    src = ms.load_checkpoint(args.checkpoint, name, kwargs) if args.checkpoint else ms.build(name, kwargs)
    model = src.model
    ms.warn_not_finite(model, "the model")
    name = src.name or name
    if shape is None:
        shape = getattr(model, "example_shape", None) or default_shape(name, model)
    _check_rank(model, shape)
    try:
        prof = profile(model, shape, name=name, latency=args.latency, warmup=args.warmup,
                       runs=args.runs, threads=args.threads, sparse_format=args.sparse_format)
    except (RuntimeError, ValueError, IndexError) as e:
        if isinstance(e, ShapeError):
            raise
        raise ShapeError(f"the model cannot run on input of shape {tuple(shape)} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if args.json:
        print_json(prof.summary() if args.no_layers else prof.to_dict())
    elif args.markdown:
        sys.stdout.write(prof.to_markdown(layers=not args.no_layers))
    else:
        from rich.console import Console

        prof.print(Console(width=max(120, Console().width)), layers=not args.no_layers)
    return 0
