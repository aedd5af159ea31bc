"""``efficientml train MODEL --dataset fashion-mnist --epochs N``: train a zoo model, save a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from efficientml.cli.common import (add_json_flag, add_overwrite_flag, flag_names, number, parse_model_args,
                                    positive_int, print_json)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a zoo model on a dataset and save a checkpoint",
                       description="Train a zoo model (see 'efficientml profile --list') on an image "
                                   "dataset; saves safetensors + JSON metadata after every epoch.")
    p.add_argument("model", help="zoo model name, e.g. vgg, resnet20, mobilenetv2, small_cnn")
    p.add_argument("--dataset", default="fashion-mnist", help="dataset name (default fashion-mnist)")
    p.add_argument("--epochs", type=number("a positive number of epochs", 0, 1e6, low_open=True), default=10.0,
                   help="epochs (may be fractional)")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=number("a learning rate in (0, 100]", 0, 100, low_open=True), default=0.1,
                   help="peak learning rate")
    p.add_argument("--optimizer", default="sgd", help="sgd or adamw")
    p.add_argument("--schedule", default="triangular", help="triangular, cosine or constant")
    p.add_argument("--weight-decay", type=number("a weight decay in [0, 1]", 0, 1), default=5e-4)
    p.add_argument("--label-smoothing", type=number("a label smoothing in [0, 1)", 0, 0.999999), default=0.0)
    p.add_argument("--no-augment", action="store_true", help="disable random crop + flip")
    p.add_argument("--pad-to", type=positive_int, default=None, help="zero-pad images to this size")
    p.add_argument("--train-subset", type=positive_int, default=None, help="use N training images")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for the model builder (repeatable), e.g. width=0.25")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="checkpoint path (default checkpoints/MODEL_DATASET.safetensors, e.g. vgg_fmnist)")
    p.add_argument("--resume", action="store_true", help="continue from --out's last saved epoch")
    add_overwrite_flag(p, "--out (and its .json and .optim.safetensors)")
    p.add_argument("--data-root", default=None, help="folder holding the dataset files")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from efficientml.core.errors import CheckpointError
    from efficientml.data.registry import get_dataset
    from efficientml.models import build_model
    from efficientml.train import (TrainConfig, fit, load_checkpoint, load_optimizer_state,
                                   make_optimizer, save_checkpoint)

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = get_dataset(args.dataset)
    with flag_names(epochs="--epochs", lr="--lr", optimizer="--optimizer", schedule="--schedule",
                    weight_decay="--weight-decay", label_smoothing="--label-smoothing"):
        cfg = TrainConfig(epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, schedule=args.schedule,
                          weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, seed=args.seed)
    kwargs = {"num_classes": spec.num_classes, "in_channels": spec.in_channels,
              **parse_model_args(args.model_arg)}
    model = build_model(args.model, **kwargs)
    out = _check_out(Path(args.out or f"checkpoints/{args.model}_{spec.short}.safetensors"), args)
    train, test = spec.loaders(batch_size=args.batch_size, augment=not args.no_augment,
                               pad_to=args.pad_to, train_subset=args.train_subset, seed=args.seed,
                               root=args.data_root)
    meta = {"model": args.model, "model_kwargs": kwargs, "dataset": args.dataset,
            "pad_to": args.pad_to, "train_config": cfg.to_dict(), "batch_size": args.batch_size,
            "augment": not args.no_augment, "train_subset": args.train_subset,
            "command": "efficientml train " + " ".join(_argv_of(args))}
    opt = make_optimizer(model, cfg)
    start_step, epochs_done = 0, []
    if args.resume:
        if not out.is_file():
            raise CheckpointError(f"--resume needs an existing checkpoint at {str(out)!r}")
        model, old = load_checkpoint(out, model=model)
        load_optimizer_state(out, opt)
        start_step, epochs_done = old.get("step", 0), old.get("history", [])
        train.epoch = len(epochs_done)

    def on_epoch(epoch: int, rec: dict) -> None:
        epochs_done.append(rec)
        save_checkpoint(out, model, {**meta, "step": rec["step"], "history": epochs_done,
                                     "test_accuracy": rec.get("eval_accuracy")}, optimizer=opt)
        if not args.json:
            print(f"epoch {len(epochs_done)}: loss {rec['train_loss']:.4f}  train {rec['train_accuracy']:.2f}%"
                  f"  test {rec['eval_accuracy']:.2f}%  ({rec['seconds']:.0f}s)", flush=True)

    hist = fit(model, train, cfg, eval_loader=test, optimizer=opt, start_step=start_step,
               on_epoch_end=on_epoch)
    result = {"checkpoint": str(out), "test_accuracy": epochs_done[-1]["eval_accuracy"] if epochs_done else None,
              "history": hist.to_dict()}
    if args.json:
        print_json(result)
    else:
        print(f"saved {out} (test accuracy {result['test_accuracy']:.2f}%)")
    return 0


def _check_out(out: Path, args: argparse.Namespace) -> Path:
    """Before any work: never replace a trained checkpoint (or its JSON and optimizer state) unless
    --overwrite, or --resume continues it; the folder must be writable."""
    from efficientml.core.outputs import check_output
    from efficientml.train.checkpoint import optim_path

    if out.suffix != ".safetensors":
        from efficientml.core.errors import ConfigError

        raise ConfigError(f"--out {str(out)!r} must end in .safetensors (the checkpoint format)")
    for p in (out, out.with_suffix(out.suffix + ".json"), optim_path(out)):
        check_output(p, overwrite=args.overwrite or args.resume, flag="--out")
    return out


def _argv_of(args: argparse.Namespace) -> list[str]:
    import sys

    return sys.argv[2:] if len(sys.argv) > 2 else [args.model]
