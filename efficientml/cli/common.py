"""Helpers shared by subcommands: --json output, printing tables, progress bars."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")


def print_json(obj: Any) -> None:
    from efficientml.core.serialization import _json_default

    json.dump(obj, sys.stdout, indent=2, default=_json_default)
    sys.stdout.write("\n")


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
    if not 0.0 <= v < 1.0:
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
