"""Where ``efficientml engine …`` gets its integer model: a checkpoint or a model spec, converted to
integer-only int8 exactly as ``efficientml quantize --method int8`` does (``apply`` with an
:class:`IntegerConfig`), calibrated on the model's own dataset when it is known (the checkpoint names
it, or ``--dataset``), else on random normal inputs (and the report says so)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from efficientml.cli.common import flag_names, model_args, parse_model_args, positive_int
from efficientml.cli.model_source import MODEL_HELP

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
CALIB_BATCH = 32                     # images per calibration batch (real or random)


def add_source_args(p: argparse.ArgumentParser) -> None:
    """The arguments every engine action shares: what to run and how it is quantized."""
    p.add_argument("source", metavar="MODEL_OR_CHECKPOINT",
                   help="a checkpoint (.safetensors written by 'efficientml train'/'prune', or a plain state dict "
                        "with --model), or a model: " + MODEL_HELP + " (random weights)")
    p.add_argument("--model", default=None, help="architecture of a plain state dict checkpoint")
    model_args(p)
    p.add_argument("--dataset", default=None,
                   help="calibrate (and draw test inputs) from this dataset, e.g. fashion-mnist (default: the one the "
                        "checkpoint was trained on; none known: random normal inputs)")
    p.add_argument("--data-root", default=None, help="folder holding the dataset files")
    p.add_argument("--input-shape", default=None, metavar="N,C,H,W",
                   help="input shape the C is generated for (batch 1); default: the dataset's images, else 32×32 "
                        "(224×224 for ImageNet models) with the first layer's channels")
    p.add_argument("--observer", default="minmax", help="activation calibrator: minmax, ema, percentile, mse, kl")
    p.add_argument("--calibration-batches", type=positive_int, default=4,
                   help=f"calibration batches of {CALIB_BATCH} inputs (default 4)")
    p.add_argument("--skip-unsupported", action="store_true",
                   help="convert layers without an integer kernel to float fallbacks (the engine then names the "
                        "first one it cannot run)")


@dataclass
class EngineSource:
    """The float model, its integer-only int8 conversion and where its inputs come from."""

    name: str
    model: torch.nn.Module
    integer: Any                      # efficientml.quant.integer.IntegerModel
    input_shape: tuple[int, ...]      # (1, C, H, W)
    dataset: str | None
    calibration: str                  # what it was calibrated on, in words
    loaders: Any = None               # the dataset's (train, test) loaders, when there is one

    def inputs(self, n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
        """``n`` inputs (n, C, H, W): real test images when the dataset is known, else random normal."""
        if self.loaders is not None:
            xs = []
            for x, _ in self.loaders[1]:
                xs.append(x)
                if sum(len(b) for b in xs) >= n:
                    break
            x = torch.cat(xs)[:n]
            return x, f"{len(x)} {self.dataset} test images"
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(n, *self.input_shape[1:], generator=gen), f"{n} random normal inputs"


def _is_checkpoint(spec: str) -> bool:
    return Path(spec).suffix in CHECKPOINT_SUFFIXES or (Path(spec).is_file() and not spec.endswith(".pt2"))


def _float_model(args: argparse.Namespace) -> tuple[Any, dict[str, Any], str]:
    from efficientml.cli import model_source as ms
    from efficientml.data.registry import get_dataset

    given = parse_model_args(args.model_arg)
    if args.dataset:
        spec = get_dataset(args.dataset)
        defaults = {"num_classes": spec.num_classes, "in_channels": spec.in_channels}
    else:
        defaults = {}
    if _is_checkpoint(args.source):
        src = ms.load_checkpoint(args.source, args.model, ms.kwargs_for(args.model, defaults, given))
        name = src.meta.get("model") or Path(args.source).stem
    else:
        from efficientml.core.errors import ConfigError

        if args.model:
            raise ConfigError("--model names the architecture of a checkpoint; MODEL_OR_CHECKPOINT "
                              f"{args.source!r} is a model already")
        src = ms.build(args.source, ms.kwargs_for(args.source, defaults, given))
        name = src.name or args.source
    ms.need_module(src, "converted for the engine")
    ms.warn_not_finite(src.model, "the model")
    return src.model.eval(), src.meta, name


def _shape(args: argparse.Namespace, model: Any, name: str, dataset: str | None, pad_to: int | None
           ) -> tuple[int, ...]:
    from efficientml.cli.profile import _check_rank, default_shape, parse_shape
    from efficientml.core.errors import ConfigError, ShapeError

    given = parse_shape(args.input_shape) if args.input_shape else None
    if given is not None and len(given) == 3:
        given = (1, *given)
    if dataset is not None:
        from efficientml.data.registry import get_dataset

        spec = get_dataset(dataset)
        size = pad_to or spec.image_size
        shape = (1, spec.in_channels, size, size)
        if given is not None and tuple(given[1:]) != shape[1:]:
            raise ConfigError(f"--input-shape {','.join(map(str, given))} does not match the {dataset} images "
                              f"({'×'.join(map(str, shape[1:]))}) the model is calibrated and checked on")
    else:
        shape = given or default_shape(name, model)
    if len(shape) != 4:
        raise ShapeError(f"the engine runs image models on N,C,H,W inputs; got --input-shape "
                         f"{','.join(map(str, shape))}")
    _check_rank(model, shape)
    return (1, *shape[1:])


def load_source(args: argparse.Namespace) -> EngineSource:
    """The model of ``args`` as an integer-only int8 model, calibrated (see the module docstring)."""
    from efficientml.core.transform import apply
    from efficientml.quant import IntegerConfig

    flags = dict(observer="--observer", calibration_batches="--calibration-batches",
                 skip_unsupported="--skip-unsupported")
    with flag_names(**flags):
        cfg = IntegerConfig(observer=args.observer, calibration_batches=args.calibration_batches,
                            skip_unsupported=args.skip_unsupported, warn_slow_layers=False)
    model, meta, name = _float_model(args)
    dataset = args.dataset or meta.get("dataset")
    pad_to = meta.get("pad_to") if not args.dataset or args.dataset == meta.get("dataset") else None
    shape = _shape(args, model, name, dataset, pad_to)
    loaders = None
    if dataset is not None:
        from efficientml.data.registry import get_dataset

        loaders = get_dataset(dataset).loaders(batch_size=CALIB_BATCH, augment=False, pad_to=pad_to,
                                               train_subset=CALIB_BATCH * cfg.calibration_batches,
                                               root=args.data_root, eval_batch_size=64)
        calib, said = loaders[0], f"{cfg.calibration_batches} batches of {dataset} training images"
    else:
        gen = torch.Generator().manual_seed(0)
        calib = [torch.randn(CALIB_BATCH, *shape[1:], generator=gen) for _ in range(cfg.calibration_batches)]
        said = (f"{cfg.calibration_batches} batches of random normal inputs: the model's dataset is not known "
                "(pass --dataset to calibrate on real images)")
    _check_runs(model, shape)
    with flag_names(**flags):
        res = apply(model, cfg, calib=calib)
    return EngineSource(name, model, res.model, shape, dataset, said, loaders)


def _check_runs(model: Any, shape: tuple[int, ...]) -> None:
    """The float model runs on ``shape``: one sentence now instead of an error deep in the tracer."""
    from efficientml.core.errors import ShapeError

    try:
        with torch.no_grad():
            model(torch.zeros(shape))
    except (RuntimeError, ValueError, IndexError) as e:
        raise ShapeError(f"the model cannot run on input of shape {tuple(shape)} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
