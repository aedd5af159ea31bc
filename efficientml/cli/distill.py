"""``efficientml distill --teacher CKPT --student MODEL_OR_CKPT --method kd --epochs 5 --out FILE``.

Trains a student (a zoo model built fresh, e.g. ``small_cnn --student-arg width=0.5``, or a checkpoint,
e.g. a pruned one) under a frozen teacher checkpoint with one distillation method (logit KD, hints,
attention, activation boundaries, FSP, RKD, similarity-preserving, weight matching; see
:mod:`efficientml.distill.methods`), evaluates both on the test set and saves the student with its
distillation and training configs. The data is the teacher's (dataset and padding from its checkpoint).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from efficientml.cli.common import (add_json_flag, add_overwrite_flag, flag_names, number, parse_model_args,
                                    positive_int, print_json)

_CKPT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="train a student under a frozen teacher (KD, hints, attention, RKD, …)",
                       description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="teacher checkpoint (efficientml, or a plain state dict with "
                                                    "--teacher-model)")
    p.add_argument("--teacher-model", default=None, help="architecture of a plain-state-dict teacher (zoo name)")
    p.add_argument("--student", required=True,
                   help="zoo model name (built fresh, see --student-arg) or a student checkpoint to start from")
    p.add_argument("--student-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="builder argument for a fresh student (repeatable), e.g. width=0.5")
    p.add_argument("--method", default="kd", help="none, kd, hint, at, at_grad, ab, fsp, rkd, sp, weights (default kd)")
    p.add_argument("--temperature", type=number("a temperature in (0, 100]", 0, 100, low_open=True), default=4.0)
    p.add_argument("--alpha", type=number("a weight in [0, 1]", 0, 1), default=0.9,
                   help="weight of the soft targets; cross-entropy gets 1 − alpha (default 0.9)")
    p.add_argument("--beta", type=number("a non-negative weight", 0), default=None,
                   help="weight of the feature/relational term (default: the method's)")
    p.add_argument("--student-layers", default="", help="comma-separated student modules (default: automatic)")
    p.add_argument("--teacher-layers", default="", help="comma-separated teacher modules, paired with the student's")
    p.add_argument("--only-where-teacher-correct", action="store_true",
                   help="use the soft targets only where the teacher is right and beats the student")
    p.add_argument("--epochs", type=number("a positive number of epochs", 0, 1e6, low_open=True), default=5.0)
    p.add_argument("--lr", type=number("a learning rate in (0, 100]", 0, 100, low_open=True), default=0.05)
    p.add_argument("--optimizer", default="sgd", help="sgd or adamw")
    p.add_argument("--weight-decay", type=number("a weight decay in [0, 1]", 0, 1), default=5e-4)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--train-subset", type=positive_int, default=None, help="train on N images")
    p.add_argument("--test-subset", type=positive_int, default=None, help="evaluate on N test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="student checkpoint (default checkpoints/STUDENT_distilled.safetensors)")
    add_overwrite_flag(p, "--out (and its .json)")
    add_json_flag(p)
    p.set_defaults(func=run)


def _names(s: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in s.split(",") if n.strip())


def _config(args: argparse.Namespace):
    from efficientml.distill import DistillConfig
    from efficientml.train import TrainConfig

    with flag_names(method="--method", temperature="--temperature", alpha="--alpha", beta="--beta",
                    student_layers="--student-layers", teacher_layers="--teacher-layers",
                    only_where_teacher_correct="--only-where-teacher-correct"):
        dcfg = DistillConfig(method=args.method, temperature=args.temperature, alpha=args.alpha, beta=args.beta,
                             student_layers=_names(args.student_layers), teacher_layers=_names(args.teacher_layers),
                             only_where_teacher_correct=args.only_where_teacher_correct)
    with flag_names(epochs="--epochs", lr="--lr", optimizer="--optimizer", weight_decay="--weight-decay"):
        tcfg = TrainConfig(epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, weight_decay=args.weight_decay,
                           seed=args.seed)
    return dcfg, tcfg


def run(args: argparse.Namespace) -> int:
    import torch

    from efficientml.data.registry import get_dataset
    from efficientml.distill import distill
    from efficientml.train import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    dcfg, tcfg = _config(args)
    out = _check_out(args)
    teacher, t_meta = _teacher(args)
    spec = get_dataset(t_meta.get("dataset") or "fashion-mnist")
    student, s_meta = _student(args, spec)
    pad_to = t_meta.get("pad_to")
    train, test = spec.loaders(batch_size=args.batch_size, augment=True, train_subset=args.train_subset,
                               test_subset=args.test_subset, pad_to=pad_to, seed=args.seed)
    teacher_acc = evaluate(teacher, test)["accuracy"]
    hist = distill(student, teacher, train, dcfg, tcfg, progress=None if not args.json else False)
    student_acc = evaluate(student, test)["accuracy"]
    meta = {**s_meta, "dataset": spec.name, "pad_to": pad_to, "distill_config": dcfg.to_dict(),
            "train_config": tcfg.to_dict(), "teacher": args.teacher, "test_accuracy": student_acc,
            "history": hist.epochs, "command": "efficientml " + " ".join(sys.argv[1:])}
    _save(out, student, meta)
    report = {"config": dcfg.to_dict(), "train": tcfg.to_dict(), "teacher": args.teacher,
              "teacher_accuracy": teacher_acc, "student_accuracy": student_acc, "history": hist.to_dict(),
              "checkpoint": str(out)}
    if args.json:
        print_json(report)
    else:
        print(f"{dcfg.method}: teacher {teacher_acc:.2f}% → student {student_acc:.2f}% after {hist.steps} steps "
              f"({hist.seconds:.0f}s); saved {out}")
    return 0


def _check_out(args: argparse.Namespace) -> Path:
    """Before any work: --out ends in .safetensors, and it and its JSON are new (or --overwrite) and writable."""
    from efficientml.core.errors import ConfigError
    from efficientml.core.outputs import check_output

    out = Path(args.out or f"checkpoints/{Path(args.student).stem}_distilled.safetensors")
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {str(out)!r} must end in .safetensors (the checkpoint format)")
    for p in (out, out.with_suffix(out.suffix + ".json")):
        check_output(p, args.overwrite, flag="--out")
    for given, flag in ((args.teacher, "--teacher"), (args.student, "--student")):
        if Path(given).resolve() == out.resolve():
            raise ConfigError(f"--out {str(out)!r} is the {flag} checkpoint itself; write the student elsewhere")
    return out


def _teacher(args: argparse.Namespace):
    from efficientml.cli import model_source as ms

    src = ms.load_checkpoint(args.teacher, args.teacher_model, ms.kwargs_for(
        args.teacher_model, {"num_classes": 10, "in_channels": 1}, {}))
    ms.need_module(src, "used as a teacher")
    ms.warn_not_finite(src.model, "the teacher")
    return src.model.eval(), src.meta


def _student(args: argparse.Namespace, spec):
    """(student, meta): a checkpoint when --student names a file, else a freshly built model."""
    from efficientml.cli import model_source as ms
    from efficientml.core.errors import ConfigError

    try:
        given = parse_model_args(args.student_arg)
    except ConfigError as e:  # the shared parser names --model-arg; this command's flag is --student-arg
        raise ConfigError(str(e).replace("--model-arg", "--student-arg")) from None
    if args.student.endswith(_CKPT_SUFFIXES) or (Path(args.student).is_file() and ".py:" not in args.student):
        if given:
            raise ConfigError("--student-arg builds a fresh student; a student checkpoint keeps its own shapes")
        src = ms.load_checkpoint(args.student)
    else:
        src = ms.build(args.student, ms.kwargs_for(args.student, {"num_classes": spec.num_classes,
                                                                  "in_channels": spec.in_channels}, given))
    ms.need_module(src, "distilled")
    return src.model, {k: v for k, v in src.meta.items() if k in ("model", "model_kwargs", "pruned")}


def _save(out: Path, student, meta: dict) -> None:
    """A pruned student keeps its channel counts (save_pruned); any other is a plain checkpoint."""
    if meta.get("pruned") is not None:
        from efficientml.prune.io import save_pruned

        save_pruned(out, student, {k: v for k, v in meta.items() if k != "pruned"})
    else:
        from efficientml.train import save_checkpoint

        save_checkpoint(out, student, meta)
