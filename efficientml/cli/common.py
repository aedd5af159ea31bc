"""Helpers shared by subcommands: --json output, printing tables, progress bars."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
from typing import Any, Iterator


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")


def print_json(obj: Any) -> None:
    """Strict JSON on stdout: NaN and infinities become null, with one warning on stderr."""
    from efficientml.core.serialization import _json_default

    bad: list[str] = []
    clean = finite_json(json.loads(json.dumps(obj, default=_json_default)), bad)
    if bad:
        print(f"efficientml: warning: {len(bad)} value(s) are not finite (NaN or inf), e.g. {bad[0]!r}, and are "
              "written as null; the weights or the result are not finite", file=sys.stderr)
    json.dump(clean, sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")
    sys.stdout.flush()


def finite_json(obj: Any, bad: list[str], where: str = "") -> Any:
    """``obj`` with every non-finite float replaced by None; their paths appended to ``bad``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        bad.append(where or "value")
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v, bad, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_json(v, bad, f"{where}[{i}]") for i, v in enumerate(obj)]
    return obj


def add_overwrite_flag(p: argparse.ArgumentParser, what: str = "--out") -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace {what} if it exists (refused without it; only after the new one is written)")


def number(kind: str, low: float | None = None, high: float | None = None, low_open: bool = False,
           integer: bool = False):
    """An argparse type: a finite number (NaN and inf are refused) in a range, e.g. ``number("a
    non-negative number", 0)``."""

    def parse(s: str) -> float:
        try:
            v = int(s) if integer else float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {s!r}") from None
        if not math.isfinite(v) or (low is not None and (v < low or (low_open and v == low))) or \
                (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"expected {kind}, got {s!r}")
        return v

    return parse


def console():
    from rich.console import Console

    return Console()


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def fraction(s: str) -> float:
    """A float in [0, 1)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {s!r}") from None
    if not 0.0 <= v < 1.0:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {s!r}")
    return v


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """``["width=0.25", "pretrained=true"]`` → ``{"width": 0.25, "pretrained": True}``."""
    from efficientml.core.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--model-arg expects KEY=VALUE, got {item!r}")
        out[key.replace("-", "_")] = _parse_value(val)
    return out


def _parse_value(v: str) -> Any:
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


@contextlib.contextmanager
def flag_names(**flags: str) -> Iterator[None]:
    """Re-raise a ConfigError whose message names a Python keyword (``group_size=None``,
    ``skip_unsupported``) with the command-line flag instead (``flag_names(group_size="--group-size")``)."""
    from efficientml.core.errors import EfficientMLError

    try:
        yield
    except EfficientMLError as e:
        msg = str(e)
        for kw, flag in flags.items():
            msg = re.sub(rf"(?<![-\w]){re.escape(kw)}(=\w+)?(?!\w)", lambda m: flag, msg)
        if msg == str(e):
            raise
        try:
            new = type(e)(msg)
        except TypeError:  # an error type with its own constructor: keep it as it is
            raise e from None
        raise new from None


def model_args(p: argparse.ArgumentParser, what: str = "the model builder") -> None:
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help=f"keyword argument for {what} (repeatable), e.g. width=0.25")


def check_input_shape(shape: tuple[int, ...], limit_bytes: float = 2e9) -> None:
    """Refuse an input that would need more than ``limit_bytes`` as fp32 (a typo such as 1,3,22400,224)."""
    from efficientml.core.errors import ShapeError

    need = 4 * math.prod(shape)
    if need > limit_bytes:
        raise ShapeError(f"--input-shape {','.join(map(str, shape))} needs {need / 1e9:.1f} GB as fp32 for the "
                         f"input alone; the limit is {limit_bytes / 1e9:.0f} GB (check the numbers)")


def device(s: str) -> str:
    """An argparse type: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``, available in this build."""
    text = s.strip().lower()
    if text in ("cpu", "auto"):
        return text
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cuda", "mps"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N, mps or auto, got {s!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{s!r} is not available: this torch build has no CUDA or no GPU is "
                                             "visible (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{s!r} is not available: {torch.cuda.device_count()} GPU(s) visible")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{s!r} is not available in this torch build (use cpu)")
    return text
