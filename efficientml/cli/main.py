"""Entry point: ``efficientml <subcommand> …``.

Each subcommand lives in ``efficientml/cli/<name>.py`` and exposes ``register(subparsers)``, which adds
its parser and sets ``func(args) -> int``. Subcommand modules are listed in ``SUBCOMMANDS`` (every
entry must exist: a new subcommand is one module plus one entry here). Library errors
(:class:`EfficientMLError`) print as one line, without a traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from efficientml.core.errors import EfficientMLError

# module name in efficientml.cli → order of appearance in --help
SUBCOMMANDS = ["demo", "profile", "train", "eval", "prune", "quantize", "distill", "engine", "formats", "llm",
               "finetune", "search"]


class _Parser(argparse.ArgumentParser):
    last_error: str | None = None  # the usage error main() repeats as JSON under --json

    def error(self, message: str) -> None:  # usage errors: one line, exit 2
        _Parser.last_error = f"{message} (see '{self.prog} --help')"
        self.exit(2, f"efficientml: error: {_Parser.last_error}\n")


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
    _Parser.last_error = None
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        given = sys.argv[1:] if argv is None else argv
        if e.code == 2 and _Parser.last_error and "--json" in given:
            sys.stdout.write(json.dumps({"error": _Parser.last_error, "exit_code": 2}) + "\n")
        raise
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except EfficientMLError as e:
        if args.debug:
            raise
        return _fail(args, str(e))
    except KeyboardInterrupt:
        print("efficientml: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `efficientml … | head -c1`: the reader left; say nothing more
        _silence_stdout()
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by it
    except OSError as e:  # a write or read that failed outside our checks (disk full mid-run, …)
        if args.debug:
            raise
        from efficientml.core.outputs import why

        where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
        return _fail(args, f"cannot read or write{where} ({why(e)})")


def _fail(args: argparse.Namespace, message: str) -> int:
    """One line on stderr; with --json also {"error": …} on stdout, so a script reading it sees why."""
    message = " ".join(message.split())  # one line, whatever the message held
    print(f"efficientml: error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        try:
            sys.stdout.write(json.dumps({"error": message, "exit_code": 2}) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()
    return 2


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
