"""``efficientml search space|costs|build-lut|train|run|extract``: neural architecture search
(efficientml.nas) on Fashion-MNIST with the once-for-all supernet.

- ``space`` prints the search space (size, the largest and smallest networks' costs); with ``--sram KB``
  and ``--flash KB`` TinyNAS's space statistics per width × resolution and the sub-space it picks.
- ``costs ARCH`` prints one architecture's parameters, MACs and int8 peak activation memory (analytical,
  equal to ``efficientml profile`` of the built model).
- ``build-lut --out FILE`` measures the per-op latency table of the space on this machine.
- ``train --out FILE`` trains the supernet by progressive shrinking (full → kernel → depth → width).
- ``run --supernet FILE`` searches (random, evolution or grid) under MACs / params / SRAM / latency
  limits, every candidate's accuracy measured on validation images after BN re-calibration; writes the
  history JSON and its Pareto plot.
- ``extract --supernet FILE --arch ARCH --out FILE`` saves the subnet as a plain ``mbnet`` checkpoint
  that ``profile``, ``prune``, ``quantize``, ``eval`` and ``engine`` take as is.

ARCH is ``largest``, ``smallest``, ``random:SEED``, a JSON file (an Arch, or a search history: its best)
or the JSON text itself.
"""

from __future__ import annotations

import argparse
from typing import Any

from efficientml.cli.common import add_json_flag, add_overwrite_flag, number, positive_int, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="neural architecture search: once-for-all supernet, TinyNAS, latency "
                       "table", description="Neural architecture search on Fashion-MNIST with the once-for-all "
                       "supernet: the space and TinyNAS statistics, analytical costs, a measured latency table, "
                       "supernet training, constrained search and subnet extraction.")
    s = p.add_subparsers(dest="search_command", metavar="ACTION")
    p.set_defaults(func=_no_action)
    a = s.add_parser("space", help="the search space; TinyNAS statistics with --sram/--flash",
                     description=_doc("space"))
    a.add_argument("--sram", type=number("a positive number of KB", 0, low_open=True), default=None, metavar="KB")
    a.add_argument("--flash", type=number("a positive number of KB", 0, low_open=True), default=None, metavar="KB")
    a.add_argument("--samples", type=positive_int, default=500, help="networks sampled per sub-space")
    add_json_flag(a)
    a.set_defaults(func=run_space)
    c = s.add_parser("costs", help="one architecture's analytical costs", description=_doc("costs"))
    c.add_argument("arch", metavar="ARCH")
    add_json_flag(c)
    c.set_defaults(func=run_costs)
    b = s.add_parser("build-lut", help="measure the per-op latency table here", description=_doc("build-lut"))
    b.add_argument("--out", required=True, metavar="FILE")
    b.add_argument("--threads", type=positive_int, default=2)
    b.add_argument("--runs", type=positive_int, default=30, help="timed runs per op (median kept)")
    add_overwrite_flag(b)
    add_json_flag(b)
    b.set_defaults(func=run_build_lut)
    t = s.add_parser("train", help="train the supernet (progressive shrinking)", description=_doc("train"))
    t.add_argument("--out", required=True, metavar="FILE.safetensors")
    t.add_argument("--epochs", default="4,2,2,2", help="epochs of the phases full,kernel,depth,width")
    t.add_argument("--train-images", type=positive_int, default=None, help="use this many training images")
    t.add_argument("--seed", type=number("a non-negative integer", 0, integer=True), default=0)
    add_overwrite_flag(t, "--out (and its .json)")
    add_json_flag(t)
    t.set_defaults(func=run_train)
    r = s.add_parser("run", help="search under constraints", description=_doc("run"))
    r.add_argument("--supernet", required=True, metavar="FILE")
    r.add_argument("--strategy", choices=("random", "evolution", "grid"), default="evolution")
    r.add_argument("--budget", type=positive_int, default=100, help="distinct architectures evaluated")
    r.add_argument("--max-macs", type=number("a positive number", 0, low_open=True), default=None)
    r.add_argument("--max-params", type=number("a positive number", 0, low_open=True), default=None)
    r.add_argument("--sram", type=number("a positive number of KB", 0, low_open=True), default=None, metavar="KB",
                   help="int8 peak activation memory limit")
    r.add_argument("--max-latency-ms", type=number("a positive number", 0, low_open=True), default=None)
    r.add_argument("--lut", default=None, metavar="FILE", help="latency table (build-lut) for --max-latency-ms")
    r.add_argument("--val-images", type=positive_int, default=2000, help="validation images per evaluation")
    r.add_argument("--seed", type=number("a non-negative integer", 0, integer=True), default=0)
    r.add_argument("--out", required=True, metavar="FILE.json", help="the history (and FILE.png, its Pareto plot)")
    add_overwrite_flag(r, "--out (and its .png)")
    add_json_flag(r)
    r.set_defaults(func=run_search)
    e = s.add_parser("extract", help="save a subnet as a plain mbnet checkpoint", description=_doc("extract"))
    e.add_argument("--supernet", required=True, metavar="FILE")
    e.add_argument("--arch", required=True, metavar="ARCH")
    e.add_argument("--out", required=True, metavar="FILE.safetensors")
    add_overwrite_flag(e, "--out (and its .json)")
    add_json_flag(e)
    e.set_defaults(func=run_extract)


def _doc(action: str) -> str:
    return next(line.strip("- ") for line in __doc__.splitlines() if line.startswith(f"- ``{action}"))


def _no_action(args: argparse.Namespace) -> int:
    from efficientml.core.errors import ConfigError

    raise ConfigError("choose an action: space, costs, build-lut, train, run or extract "
                      "(see 'efficientml search --help')")


def _fmt(c: dict) -> str:
    return f"{c['params']:,} params, {c['macs'] / 1e6:.2f} M MACs, int8 peak {c['peak_bytes_int8'] / 1024:.1f} KB"


def run_space(args: argparse.Namespace) -> int:
    from efficientml.core.errors import ConfigError
    from efficientml.nas.costs import subnet_cost
    from efficientml.nas.space import MBSpace
    from efficientml.nas.tinynas import pick_space, space_statistics

    if (args.sram is None) != (args.flash is None):
        raise ConfigError("TinyNAS statistics need both --sram and --flash (KB)")
    space = MBSpace(widths=(0.5, 0.75, 1.0), resolutions=(20, 24, 28, 32)) if args.sram else MBSpace()
    rep: dict[str, Any] = {"space": space.to_dict(), "size": space.size(),
                           "largest": subnet_cost(space, space.largest()).to_dict(),
                           "smallest": subnet_cost(space, space.smallest()).to_dict()}
    if args.sram:
        rows = space_statistics(space, args.sram * 1024, args.flash * 1024, args.samples)
        rep["tinynas"] = {"rows": rows, "pick": pick_space(rows)}
    if args.json:
        print_json(rep)
        return 0
    print(f"{rep['size']:,} networks; largest: {_fmt(rep['largest'])}; smallest: {_fmt(rep['smallest'])}")
    for row in rep.get("tinynas", {}).get("rows", []):
        mean = row["mean_macs_fitting"]
        print(f"  width {row['width']:<5} res {row['resolution']:<3} fit {100 * row['fit_fraction']:5.1f}%  "
              f"mean MACs " + (f"{mean / 1e6:.2f} M" if mean else "-"))
    if "tinynas" in rep:
        pk = rep["tinynas"]["pick"]
        print("picked: " + (f"width {pk['width']}, resolution {pk['resolution']}" if pk else "nothing fits"))
    return 0


def run_costs(args: argparse.Namespace) -> int:
    from efficientml.nas.costs import subnet_cost
    from efficientml.nas.space import MBSpace

    from efficientml.cli.search_run import parse_arch

    space = MBSpace()
    arch = parse_arch(args.arch, space)
    c = subnet_cost(space, arch).to_dict()
    if args.json:
        print_json({"arch": arch.to_dict(), "key": arch.key(), **c})
    else:
        print(f"{arch.key()}: {_fmt(c)} at {arch.resolution}×{arch.resolution}")
    return 0


def run_build_lut(args: argparse.Namespace) -> int:
    from efficientml.core.outputs import check_output
    from efficientml.nas.latency import build_lut
    from efficientml.nas.space import MBSpace

    from efficientml.core.serialization import write_json

    out = check_output(args.out, args.overwrite)
    table = build_lut(MBSpace(), threads=args.threads, runs=args.runs)
    write_json(out, table.to_dict())
    if args.json:
        print_json({"out": str(out), "entries": len(table.entries), "threads": args.threads})
    else:
        print(f"measured {len(table.entries)} ops at {args.threads} threads; wrote {out}")
    return 0


def _later(name: str):
    """``func`` for the actions that train or search (efficientml.cli.search_run, imported when run)."""
    def run(args: argparse.Namespace) -> int:
        from efficientml.cli import search_run

        return getattr(search_run, name)(args)
    return run


run_train, run_search, run_extract = _later("run_train"), _later("run_search"), _later("run_extract")
