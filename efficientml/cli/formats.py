"""``efficientml formats``: every number format with its range, smallest normal, precision and bits."""

from __future__ import annotations

import argparse

from efficientml.cli.common import add_json_flag, console, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("formats", help="list number formats (range, smallest normal, precision, bits)",
                       description="List the number formats efficientml emulates exactly.")
    p.add_argument("names", nargs="*", help="only these formats (default: all)")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from efficientml.quant.formats import FORMATS

    names = args.names or FORMATS.names()
    rows = [FORMATS.get(n).info() | {"name": n} for n in names]
    if args.json:
        print_json(rows)
        return 0
    from rich.table import Table

    t = Table(title="number formats")
    for col in ("name", "bits", "layout", "max", "min normal", "min subnormal", "epsilon", "special"):
        t.add_column(col, justify="right" if col not in ("name", "layout", "special") else "left")
    for r in rows:
        bits = r.get("bits_per_element", r["bits"])
        t.add_row(r["name"], f"{bits:g}", str(r["layout"]), f"{r['max']:.4g}", f"{r['min_normal']:.4g}",
                  f"{r['min_subnormal']:.4g}", f"{r['epsilon']:.4g}", str(r["special"]))
    console().print(t)
    return 0
