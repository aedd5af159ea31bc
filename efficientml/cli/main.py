"""Entry point: ``efficientml <subcommand> …``.

Each subcommand lives in ``efficientml/cli/<name>.py`` and exposes ``register(subparsers)``, which adds
its parser and sets ``func(args) -> int``. Subcommand modules are listed in ``SUBCOMMANDS`` (every
entry must exist: a new subcommand is one module plus one entry here). Library errors
(:class:`EfficientMLError`) print as one line, without a traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from efficientml.core.errors import EfficientMLError

# module name in efficientml.cli → order of appearance in --help
SUBCOMMANDS = ["demo", "profile", "train", "eval", "prune", "quantize", "formats", "llm", "finetune"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors: one line, exit 2
        self.exit(2, f"efficientml: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="efficientml",
        description="Make neural networks smaller and faster, and prove it with measurements.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    from efficientml import __version__

    parser.add_argument("--version", action="version", version=f"efficientml {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in SUBCOMMANDS:
        importlib.import_module(f"efficientml.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except EfficientMLError as e:
        if args.debug:
            raise
        print(f"efficientml: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("efficientml: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
