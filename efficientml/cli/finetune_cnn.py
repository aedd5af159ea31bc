"""``efficientml finetune resnet20 --method tinytl|bitfit|last-layer|full --dataset fashion-mnist --out DIR``:
transfer a zoo CNN (pretrained where weights exist) to an image dataset of the project, with its
training memory measured (activations kept for backward + parameters, gradients, AdamW state)."""

from __future__ import annotations

import argparse

from efficientml.cli.common import console, print_json
from efficientml.cli.finetune_args import CNN_METHODS
from efficientml.core.errors import ConfigError


def _check(args: argparse.Namespace) -> None:
    if args.method not in CNN_METHODS:
        raise ConfigError(f"--method {args.method} is for LLMs; a CNN such as {args.model!r} takes one of "
                          f"{', '.join(CNN_METHODS)}")
    if args.data:
        raise ConfigError("--data FILE.jsonl is for LLMs; a CNN trains on --dataset NAME (e.g. fashion-mnist)")


def _loaders(args: argparse.Namespace, channels: int, size: int):
    from efficientml.data.registry import get_dataset
    from efficientml.finetune.transfer import ChannelRepeat

    spec = get_dataset(args.dataset)
    if spec.image_size > size:
        raise ConfigError(f"dataset {args.dataset!r} has {spec.image_size}px images; {args.model!r} takes {size}px")
    train, test = spec.loaders(batch_size=args.batch_size, augment=False, pad_to=size, seed=args.seed,
                               train_subset=args.train_subset, test_subset=args.test_subset)
    return spec, ChannelRepeat(train, channels), ChannelRepeat(test, channels)


def run_cnn(args: argparse.Namespace) -> int:
    import torch

    from efficientml.core.outputs import check_output
    from efficientml.core.serialization import atomic_dir, save_state_dict, write_json
    from efficientml.finetune.method_io import save_trainable
    from efficientml.finetune.transfer import prepare_cnn, transfer
    from efficientml.models.registry import build_model
    from efficientml.train import TrainConfig

    _check(args)
    out = check_output(args.out, args.overwrite, folder=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = build_model(args.model, pretrained=not args.no_pretrained)
    except ConfigError:
        if args.no_pretrained:
            raise
        raise ConfigError(f"{args.model!r} has no pretrained weights here; pass --no-pretrained to start from "
                          "random weights") from None
    spec, train, test = _loaders(args, 3, 32)
    model, config = prepare_cnn(model, args.method, spec.num_classes)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr or 1e-3, optimizer="adamw", weight_decay=0.0,
                      schedule="cosine", warmup_frac=0.05, seed=args.seed, max_steps=args.steps)
    quiet = args.json or args.no_progress
    report = transfer(model, train, test, cfg, progress=not quiet)
    report.update(model=args.model, method=args.method, dataset=args.dataset, out=str(out),
                  config=config.to_dict() if config is not None else None, train_config=cfg.to_dict())
    if config is None:  # full fine-tuning: every tensor, batch-norm statistics included
        with atomic_dir(out, overwrite=args.overwrite) as tmp:
            save_state_dict(tmp / "model.safetensors", {k: v.contiguous() for k, v in model.state_dict().items()})
    else:
        save_trainable(model, out, config, overwrite=args.overwrite)
    write_json(out / "training_log.json", report)
    if args.json:
        print_json(report)
        return 0
    m, t = report["memory"], report["trainable"]
    console().print(f"{args.method}: {t['trainable']:,} of {t['total']:,} parameters trained; test accuracy "
                    f"{report['accuracy']:.2f}%; training memory {m['total_bytes'] / 2**20:.1f} MiB "
                    f"(activations {m['activation_bytes'] / 2**20:.1f} MiB at batch {m['batch']}); saved to {out}")
    return 0
