"""Where a CNN command's model comes from — one resolution for profile, prune, quantize and eval.

``--model`` / the MODEL argument may be

- a zoo name (``resnet20``; builder kwargs from ``--model-arg KEY=VALUE``);
- ``path/to/file.py:Name`` — a ``nn.Module`` class or a factory function in the user's file, called
  with the ``--model-arg`` values. **This imports and runs that file**, as ``python file.py`` would;
- ``path/to/program.pt2`` — a ``torch.export`` program (``torch.export.save``). Profiling reads its
  graph; pruning and quantization need the original module (the unlifted graph has no layers).

``--checkpoint`` (or a command's CHECKPOINT) may be an efficientml checkpoint (it names its zoo model;
a pruned one is rebuilt at its pruned shapes), or a plain state dict (``.safetensors``, ``.pt``,
``.pth``, ``.bin``; tensors only, unpickled with ``weights_only``) for the architecture given by the
model argument.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from efficientml.core.errors import CheckpointError, ConfigError, UnsupportedError
from efficientml.core.paths import require_file

MODEL_HELP = ("zoo model name (see 'efficientml profile --list'), path/to/file.py:Name (a nn.Module class "
              "or factory; this imports and runs that file) or a torch.export program (.pt2)")


@dataclass
class Source:
    model: nn.Module
    meta: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    exported: bool = False  # an unlifted torch.export program: no layers to prune or quantize


def is_user_file(spec: str | None) -> bool:
    return bool(spec) and (spec.endswith(".pt2") or ".py:" in spec)


def build(spec: str, kwargs: dict[str, Any] | None = None) -> Source:
    """The architecture named by ``spec`` (zoo name, ``file.py:Name`` or ``.pt2``), freshly built."""
    kwargs = dict(kwargs or {})
    if spec.endswith(".pt2"):
        if kwargs:
            raise ConfigError("--model-arg does not apply to a .pt2 program (its shapes are fixed)")
        return Source(load_exported(spec), {"model": spec}, Path(spec).stem, exported=True)
    if ".py:" in spec:
        return Source(_from_file(spec, kwargs), {"model": spec, "model_kwargs": kwargs}, spec.rpartition(":")[2])
    from efficientml.models import build_model

    return Source(build_model(spec, **kwargs), {"model": spec, "model_kwargs": kwargs}, spec)


def _from_file(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    path_text, _, attr = spec.rpartition(":")
    path = require_file(path_text, "model file", ConfigError)
    if not attr.isidentifier():
        raise ConfigError(f"--model {spec!r}: expected path/to/file.py:Name with Name a class or function")
    name = f"efficientml_user_model_{abs(hash(str(path.resolve())))}"
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        mod_spec.loader.exec_module(module)  # runs the user's file: what --model file.py:Name asks for
    except SyntaxError as e:
        raise ConfigError(f"model file {path_text!r} has a syntax error on line {e.lineno}: {e.msg}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        names = [n for n, v in vars(module).items() if inspect.isclass(v) and issubclass(v, nn.Module)
                 and v.__module__ == name]
        raise ConfigError(f"model file {path_text!r} defines no {attr!r}"
                          + (f"; its nn.Module classes: {', '.join(names)}" if names else ""))
    if not callable(obj):
        raise ConfigError(f"{spec!r} is a {type(obj).__name__}; expected a nn.Module class or a factory")
    try:
        inspect.signature(obj).bind(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{spec!r} does not accept --model-arg {sorted(kwargs)} ({e})") from None
    except ValueError:
        pass  # no signature to check (a builtin); the call reports
    model = obj(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec!r} returned a {type(model).__name__}; expected a torch.nn.Module")
    return model


class ExportedModule(nn.Module):
    """An unlifted ``torch.export`` program as a module: eval()/train() are no-ops (the program's
    mode was fixed at export) and aten calls run through their torch functions so the analysis sees
    them."""

    def __init__(self, program: nn.Module, example_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.program = program
        self.example_shape = example_shape  # the input shape it was exported with

    def train(self, mode: bool = True) -> "ExportedModule":
        self.training = mode
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.program(*args, **kwargs)


# aten overloads whose positional signature is that of a torch function the analysis costs
_TORCH_LEVEL = {"conv1d": torch.conv1d, "conv2d": torch.conv2d, "conv3d": torch.conv3d,
                "linear": torch.nn.functional.linear, "matmul": torch.matmul, "mm": torch.mm,
                "bmm": torch.bmm, "relu": torch.relu, "hardtanh": torch.nn.functional.hardtanh,
                "add": torch.add, "mul": torch.mul, "sigmoid": torch.sigmoid, "flatten": torch.flatten,
                "max_pool2d": torch.nn.functional.max_pool2d, "avg_pool2d": torch.nn.functional.avg_pool2d,
                "adaptive_avg_pool2d": torch.nn.functional.adaptive_avg_pool2d, "cat": torch.cat,
                "mean": torch.mean, "silu": torch.nn.functional.silu,
                "hardswish": torch.nn.functional.hardswish}


def load_exported(path: str) -> nn.Module:
    p = require_file(path, "exported program", CheckpointError)
    import logging

    quiet = logging.getLogger("torch.export")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # torch logs a traceback before raising on a bad archive; we say it in one line
    try:
        ep = torch.export.load(str(p))
    except Exception as e:  # torch raises many types for a bad archive
        raise CheckpointError(f"{path!r} is not a torch.export program saved by torch.export.save "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    finally:
        quiet.setLevel(level)
    gm = ep.module()
    for node in gm.graph.nodes:
        packet = getattr(getattr(node.target, "overloadpacket", None), "__name__", None)
        if node.op == "call_function" and packet in _TORCH_LEVEL and not node.kwargs:
            node.target = _TORCH_LEVEL[packet]
    gm.recompile()
    ex = getattr(ep, "example_inputs", None)
    args = ex[0] if isinstance(ex, tuple) and ex else ()
    shape = tuple(args[0].shape) if len(args) == 1 and isinstance(args[0], torch.Tensor) else None
    return ExportedModule(gm, shape)


def need_module(src: Source, verb: str) -> None:
    if src.exported:
        raise UnsupportedError(f"a .pt2 program cannot be {verb}: torch.export keeps no layers to change; "
                               "pass the model as path/to/file.py:Name (or a zoo name) with --checkpoint")


def kwargs_for(spec: str | None, defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """Builder kwargs: a zoo model gets the dataset's ``defaults`` (num_classes, in_channels) under
    ``--model-arg``; a user's class or factory gets only what was given."""
    return dict(given) if is_user_file(spec) else {**defaults, **given}


def load_checkpoint(path: str, spec: str | None = None, kwargs: dict[str, Any] | None = None) -> Source:
    """An efficientml checkpoint (trained, pruned or quantized) or a plain state dict, loaded into the
    architecture ``spec`` (zoo name or ``file.py:Name``; default: the one the checkpoint names, which
    a different zoo name may not contradict)."""
    p = require_file(path, "checkpoint file")
    meta = _our_meta(p)
    named = (meta or {}).get("model")
    if meta is not None and not named and not spec:
        raise CheckpointError(f"{path!r} does not name its model; give the model (zoo name or file.py:Name)")
    if meta is None and not spec:
        raise ConfigError(f"{path!r} is a plain state dict that does not name its architecture; give the "
                          "model too (a zoo name or path/to/file.py:Name)")
    if named and spec and spec != named and not is_user_file(spec):
        raise ConfigError(f"checkpoint {path!r} holds a {named!r} model, not {spec!r}")
    if named and (not spec or spec == named):
        spec, kwargs = named, meta.get("model_kwargs") or {}
    src = build(spec, kwargs or {})
    need_module(src, "loaded with a state dict")
    state = _read_state(p)
    if meta is not None and meta.get("pruned") is not None:
        from efficientml.prune.surgery import resize_like

        resize_like(src.model, state, meta["pruned"].get("channel_attrs"))
    _fit(src.model, state, path)
    src.meta = {**src.meta, **(meta or {})}
    return src


def _our_meta(p: Path) -> dict[str, Any] | None:
    if p.suffix != ".safetensors":
        return None
    from efficientml.train.checkpoint import META_KEY, read_checkpoint_meta
    from efficientml.core.serialization import read_metadata

    try:
        md = read_metadata(p)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{str(p)!r} is not a readable safetensors file ({e})") from None
    return read_checkpoint_meta(p) if META_KEY in md else None


def _read_state(p: Path) -> dict[str, torch.Tensor]:
    if p.suffix == ".safetensors":
        from efficientml.core.serialization import load_state_dict

        return load_state_dict(p)
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError … for a bad or unsafe file
        raise CheckpointError(f"{str(p)!r} is not a PyTorch state dict of tensors ({type(e).__name__})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]  # the common {"state_dict": …, "epoch": …} wrapper
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{str(p)!r} is not a state dict of named tensors")
    return sd


def _fit(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    own = model.state_dict()
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path!r} does not fit the model: tensor {k!r} has shape {tuple(v.shape)}, "
                                  f"the model's is {tuple(own[k].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(f"{path!r} does not fit the model: missing {list(missing)[:4]}, "
                              f"unexpected {list(unexpected)[:4]}")


def warn_not_finite(model: nn.Module, what: str) -> None:
    """One stderr warning if any parameter or buffer holds NaN or infinity."""
    bad = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        print(f"efficientml: warning: {what} has non-finite values (NaN or inf) in {len(bad)} tensor(s), "
              f"e.g. {bad[0]!r}; its results will not be meaningful", file=sys.stderr)

