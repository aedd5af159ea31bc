"""``efficientml eval CHECKPOINT``: test accuracy of a saved model on its dataset."""

from __future__ import annotations

import argparse

from efficientml.cli.common import add_json_flag, model_args, parse_model_args, positive_int, print_json
from efficientml.cli.model_source import MODEL_HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint's test accuracy",
                       description="Evaluate a checkpoint written by 'efficientml train' (or any "
                                   "efficientml checkpoint that names its model) on a test set.")
    p.add_argument("checkpoint", help="an efficientml checkpoint (.safetensors), or a plain state dict "
                                      "(.safetensors, .pt) with --model")
    p.add_argument("--model", default=None, help="architecture of a plain state dict: " + MODEL_HELP)
    model_args(p)
    p.add_argument("--dataset", default=None, help="dataset (default: the one it was trained on)")
    p.add_argument("--batch-size", type=positive_int, default=512)
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--data-root", default=None)
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from efficientml.core.errors import ShapeError
    from efficientml.data.registry import get_dataset
    from efficientml.train import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    from efficientml.cli import model_source as ms

    if args.dataset:
        get_dataset(args.dataset)  # an unknown name fails before the model loads
    src = ms.load_checkpoint(args.checkpoint, args.model, ms.kwargs_for(
        args.model, {"num_classes": 10, "in_channels": 1}, parse_model_args(args.model_arg)))
    ms.need_module(src, "evaluated with a state dict")
    model, meta = src.model, src.meta
    ms.warn_not_finite(model, "the model")
    spec = get_dataset(args.dataset or meta.get("dataset", "fashion-mnist"))
    _, test = spec.loaders(batch_size=args.batch_size, eval_batch_size=args.batch_size,
                           augment=False, pad_to=meta.get("pad_to"), root=args.data_root, test_only=True)
    want = meta.get("model_kwargs", {}).get("in_channels")
    if want is not None and want != spec.in_channels:
        raise ShapeError(f"{args.checkpoint!r} expects {want}-channel images but dataset {spec.name!r} "
                         f"has {spec.in_channels}-channel images")
    res = evaluate(model, test)
    out = {"checkpoint": args.checkpoint, "model": meta.get("model"), "dataset": spec.name, **res}
    if args.json:
        print_json(out)
    else:
        print(f"{spec.name} test accuracy: {res['accuracy']:.2f}%  (loss {res['loss']:.4f}, "
              f"{res['examples']} images)")
    return 0
