"""``efficientml prune MODEL --checkpoint … --method channel --ratio 0.5 --finetune-epochs 5``.

Prunes a zoo model (from a checkpoint, or freshly built), optionally fine-tunes it with the masks
re-applied after every step (learning rate 10× below the checkpoint's by default), prints the
before/after table (params, size, MACs, measured CPU latency at batch 1 and 64, accuracy) and saves
the pruned model and a JSON report holding the applied config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from efficientml.cli.common import (add_json_flag, add_overwrite_flag, flag_names, fraction, number, parse_model_args,
                                    positive_int, print_json)
from efficientml.cli.model_source import MODEL_HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a model (any granularity/criterion), fine-tune, report",
                       description=__doc__.splitlines()[0])
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint to start from: an efficientml one, or a plain state dict (.safetensors, .pt) "
                        "for MODEL")
    p.add_argument("--method", default="channel",
                   help="fine, pattern, nm, vector, kernel or channel (default channel)")
    p.add_argument("--ratio", type=fraction, default=0.5, help="fraction removed, in [0, 1)")
    p.add_argument("--criterion", default="l2",
                   help="l1, l2, bn_gamma, taylor, apoz, thinet, input_l2, first (default l2)")
    p.add_argument("--n", type=positive_int, default=2, help="N of N:M")
    p.add_argument("--m", type=positive_int, default=4, help="M of N:M")
    p.add_argument("--layers", default="", help="comma-separated layer names (default: all)")
    p.add_argument("--exclude", default="", help="comma-separated layer names to leave alone")
    p.add_argument("--sort", action="store_true",
                   help="sort input channels by norm before pruning (keep-first then keeps the strongest)")
    p.add_argument("--skip-unsupported", action="store_true",
                   help="leave channels touched by unknown ops unpruned instead of failing")
    p.add_argument("--finetune-epochs", type=number("a non-negative number of epochs", 0, 1e6), default=0.0,
                   help="fine-tuning epochs (fractional ok)")
    p.add_argument("--lr", type=number("a learning rate in (0, 100]", 0, 100, low_open=True), default=None,
                   help="fine-tuning LR (default: checkpoint LR / 10)")
    p.add_argument("--teacher", default=None, metavar="CKPT|self",
                   help="distil while fine-tuning: CE + --kd-weight · KD from this checkpoint, or 'self' for the "
                        "model before pruning (needs --finetune-epochs)")
    p.add_argument("--kd-temperature", type=number("a temperature in (0, 100]", 0, 100, low_open=True), default=4.0)
    p.add_argument("--kd-weight", type=number("a non-negative weight", 0), default=1.0,
                   help="weight of the KD term next to cross-entropy (default 1)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--train-subset", type=positive_int, default=None, help="fine-tune on N images")
    p.add_argument("--test-subset", type=positive_int, default=None, help="evaluate on N test images")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="model builder argument when no checkpoint is given, e.g. width=0.25")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for pruning and fine-tuning (latency is always measured with 2)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--out", default=None, help="pruned checkpoint path (default checkpoints/MODEL_pruned.safetensors)")
    p.add_argument("--report", default=None, help="write the JSON report here")
    add_overwrite_flag(p, "--out and --report")
    add_json_flag(p)
    p.set_defaults(func=run)


def _names(s: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in s.split(",") if n.strip())


def run(args: argparse.Namespace) -> int:
    import torch

    from efficientml.core.serialization import write_json
    from efficientml.core.transform import LayerFilter, apply
    from efficientml.data.registry import get_dataset
    from efficientml.prune import PruneConfig
    from efficientml.prune.io import save_pruned
    from efficientml.prune.report import compare, format_table
    from efficientml.train import TrainConfig, evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = get_dataset(args.dataset)
    with flag_names(method="--method", sparsity="--ratio", criterion="--criterion", n="--n", m="--m",
                    on_unsupported="--skip-unsupported"):
        config = PruneConfig(method=args.method, sparsity=args.ratio, criterion=args.criterion, n=args.n, m=args.m,
                             sort_inputs=args.sort, on_unsupported="skip" if args.skip_unsupported else "error")
    out = _check_outputs(args)
    if args.teacher and args.finetune_epochs == 0:
        from efficientml.core.errors import ConfigError

        raise ConfigError("--teacher teaches during fine-tuning; give --finetune-epochs a positive number too")
    model, meta, base_lr = _model(args, spec)
    model.eval()
    teacher = model if args.teacher == "self" else _teacher(args.teacher) if args.teacher else None
    layers = LayerFilter(include=_names(args.layers), exclude=_names(args.exclude))
    train, test = spec.loaders(batch_size=args.batch_size, augment=True, train_subset=args.train_subset,
                               test_subset=args.test_subset, pad_to=meta.get("pad_to"))
    sample = next(iter(test))[0][:1]
    sample_shape = tuple(sample.shape[1:])
    result = apply(model, config, calib=train, filter=layers, example_inputs=sample.repeat(2, 1, 1, 1))
    pruned = result.model
    ft = None
    if args.finetune_epochs > 0:
        ft = TrainConfig(epochs=args.finetune_epochs, lr=args.lr or base_lr / 10, schedule="cosine",
                         warmup_frac=0.0)
        _finetune(args, pruned, teacher, train, ft, result.after_step)
    if result.masks is not None:
        result.masks.remove()
    acc = lambda m: evaluate(m, test)["accuracy"]  # noqa: E731
    table = compare(model, pruned, sample_shape, accuracy=acc, batch_sizes=() if args.no_latency else (1, 64))
    save_pruned(out, pruned, {**meta, "prune_config": config.to_dict(),
                              "finetune": ft.to_dict() if ft else None, "distill": _kd_record(args),
                              "test_accuracy": table["after"]["accuracy"]})
    report = {"config": config.to_dict(), "finetune": ft.to_dict() if ft else None, "distill": _kd_record(args),
              "table": table, "summary": result.summary(), "checkpoint": str(out),
              "command": "efficientml " + " ".join(sys.argv[1:])}
    if args.report:
        write_json(args.report, report)
    if args.json:
        print_json(report)
    else:
        print(format_table(table))
        if result.skipped:
            print("left unpruned: " + "; ".join(result.skipped))
        print(f"saved {out}")
    return 0


def _finetune(args: argparse.Namespace, pruned, teacher, train, ft, after_step) -> None:
    """Fine-tune the pruned model; with a teacher (--teacher: a checkpoint, or the unpruned model, which
    ``apply`` left untouched), KD is added to the cross-entropy through :class:`efficientml.distill.TeacherLoss`."""
    from efficientml.train import fit

    progress = None if not args.json else False
    if teacher is None:
        fit(pruned, train, ft, after_step=after_step, progress=progress)
        return
    from efficientml.distill import TeacherLoss

    with TeacherLoss(teacher, pruned, temperature=args.kd_temperature, weight=args.kd_weight) as kd:
        fit(pruned, train, ft, after_step=after_step, extra_loss=kd, progress=progress)


def _teacher(path: str):
    from efficientml.cli import model_source as ms

    src = ms.load_checkpoint(path)
    ms.need_module(src, "used as a teacher")
    ms.warn_not_finite(src.model, "the teacher")
    return src.model


def _kd_record(args: argparse.Namespace) -> dict | None:
    if not args.teacher or args.finetune_epochs == 0:
        return None
    return {"teacher": args.teacher, "temperature": args.kd_temperature, "weight": args.kd_weight}


def _check_outputs(args: argparse.Namespace) -> Path:
    """Before any work: --out (and its JSON) and --report must be new (or --overwrite) and writable."""
    from efficientml.core.errors import ConfigError
    from efficientml.core.outputs import check_output

    out = Path(args.out or f"checkpoints/{_stem(args.model)}_pruned.safetensors")
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {str(out)!r} must end in .safetensors (the checkpoint format)")
    check_output(out, args.overwrite, flag="--out")
    check_output(out.with_suffix(out.suffix + ".json"), args.overwrite, flag="--out")
    if args.report:
        if Path(args.report).resolve() in (out.resolve(), out.with_suffix(out.suffix + ".json").resolve()):
            raise ConfigError(f"--report {args.report!r} is the checkpoint's own path; give another file")
        check_output(args.report, args.overwrite, flag="--report")
    return out


def _stem(model: str) -> str:
    return Path(model.rpartition(":")[2] if ".py:" in model else model).stem


def _model(args: argparse.Namespace, spec):
    """(model, meta, base learning rate) from MODEL and --checkpoint (model_source.py)."""
    from efficientml.cli import model_source as ms

    kwargs = ms.kwargs_for(args.model, {"num_classes": spec.num_classes, "in_channels": spec.in_channels},
                           parse_model_args(args.model_arg))
    src = ms.load_checkpoint(args.checkpoint, args.model, kwargs) if args.checkpoint else ms.build(args.model, kwargs)
    ms.need_module(src, "pruned")
    ms.warn_not_finite(src.model, "the model")
    base_lr = (src.meta.get("train_config") or {}).get("lr", 0.1)
    return src.model, src.meta, base_lr
