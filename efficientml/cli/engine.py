"""``efficientml engine build|run|mcu MODEL_OR_CHECKPOINT``: the int8 CNN runtime (efficientml.engine).

- ``build --out DIR`` writes ``<prefix>.c``, ``<prefix>.h`` and ``<prefix>_plan.json`` (the memory
  plan: arena, per-op live bytes, against analysis' per-layer peak); ``--sram KB`` refuses a model
  whose arena does not fit and names the smallest budget that does.
- ``run`` compiles the C on this machine, checks it bit for bit against the Python integer reference
  on N inputs and times it next to PyTorch (int8 and fp32).
- ``mcu`` cross-compiles it for a Cortex-M3, runs it under ``qemu-system-arm`` (mps2-an385) and
  reports Flash/SRAM and bit-exactness.

The integer model is made as ``efficientml quantize --method int8`` makes it (see
:mod:`efficientml.cli.engine_source`).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from efficientml.cli.common import add_json_flag, console, number, positive_int, print_json
from efficientml.cli.engine_source import add_source_args, load_source

BOARD_SRAM_KB, BOARD_FLASH_KB = 256, 1024        # the target part: fits 256 KB SRAM, 1 MB Flash


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("engine", help="int8 CNN runtime: memory plan, generated C, host and Cortex-M runs",
                       description="Run an integer-only int8 CNN on efficientml's own engine: plan its memory, "
                                   "generate self-contained C, check it bit-exact on this machine or under QEMU.")
    s = p.add_subparsers(dest="engine_command", metavar="ACTION")
    p.set_defaults(func=_no_action)
    b = s.add_parser("build", help="write <prefix>.c/.h and the memory plan", description=_doc("build"))
    add_source_args(b)
    b.add_argument("--out", required=True, metavar="DIR", help="folder for <prefix>.c, <prefix>.h, <prefix>_plan.json")
    b.add_argument("--sram", type=number("a positive number of KB", 0, low_open=True), default=None, metavar="KB",
                   help="SRAM budget for the arena; a model that does not fit is refused with the smallest budget")
    _common(b)
    b.add_argument("--overwrite", "--force", dest="overwrite", action="store_true",
                   help="replace existing output files (refused without it)")
    b.set_defaults(func=run_build)
    r = s.add_parser("run", help="compile on this machine: bit-exactness and latency", description=_doc("run"))
    add_source_args(r)
    r.add_argument("--samples", type=positive_int, default=16, help="inputs checked against the reference")
    r.add_argument("--runs", type=positive_int, default=20, help="timed runs per latency (batch 1)")
    r.add_argument("--warmup", type=number("a non-negative integer", 0, 10_000, integer=True), default=3)
    r.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads for the PyTorch timings")
    _common(r)
    r.set_defaults(func=run_host)
    m = s.add_parser("mcu", help="cross-compile for a Cortex-M3 and run under QEMU", description=_doc("mcu"))
    add_source_args(m)
    m.add_argument("--sample", type=number("a non-negative integer", 0, integer=True), default=0,
                   help="which input (of the dataset's test images, else random) the firmware runs")
    _common(m)
    m.set_defaults(func=run_mcu)


def _doc(action: str) -> str:
    return next(line.strip("- ") for line in __doc__.splitlines() if line.startswith(f"- ``{action}"))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix", default="model", help="C identifier prefix: <prefix>_run(), <prefix>.c (default model)")
    p.add_argument("--no-inplace", action="store_true", help="plan without in-place depthwise/elementwise reuse")
    add_json_flag(p)


def _no_action(args: argparse.Namespace) -> int:
    from efficientml.core.errors import ConfigError

    raise ConfigError("choose an action: build, run or mcu (see 'efficientml engine --help')")


def _generate(args: argparse.Namespace, compile: bool = False) -> tuple[Any, Any]:
    """(source, GeneratedModel), or (source, EngineModel) compiled for this machine with ``compile``."""
    from efficientml.engine import compile_engine, generate
    from efficientml.engine.codegen import check_prefix

    with _flag("--prefix"):
        check_prefix(args.prefix)
    src = load_source(args)
    make = compile_engine if compile else generate
    return src, make(src.integer, _example(src), args.prefix, inplace=not args.no_inplace)


def _example(src: Any) -> Any:
    import torch

    return torch.zeros(src.input_shape)


def _flag(name: str):
    from efficientml.cli.common import flag_names

    return flag_names(prefix=name)


def plan_report(src: Any, gen: Any) -> dict[str, Any]:
    """The plan of ``gen`` as JSON: sizes, each op's live bytes and offset, against analysis."""
    from efficientml.engine import compare_with_analysis

    plan = gen.plan
    cmp = compare_with_analysis(plan, src.model, src.input_shape)
    ops = [{"name": op.name, "kind": op.kind, "out_shape": list(op.out.shape), "live_bytes": live,
            "out_offset": plan.address(op.out)} for op, live in zip(plan.graph.ops, plan.op_live_bytes)]
    d = plan.to_dict()
    return {"model": src.name, "input_shape": list(src.input_shape), "calibration": src.calibration,
            "path": "real (generated C, integer kernels)", "arena_bytes": plan.arena_bytes,
            "live_peak_bytes": plan.live_peak_bytes, "no_reuse_bytes": plan.no_reuse_bytes,
            "per_layer_peak_bytes": cmp["per_layer_peak_bytes"], "arena_vs_per_layer": cmp["arena_vs_per_layer"],
            "peak_op": d["peak_op"], "inplace_ops": d["inplace_ops"], "ops": ops}


def _print_plan(rep: dict[str, Any], top: int = 5) -> None:
    from rich.table import Table

    c = console()
    c.print(f"{rep['model']} at {'×'.join(map(str, rep['input_shape']))}, int8 calibrated on {rep['calibration']}")
    c.print(f"arena {rep['arena_bytes']:,} B ({rep['arena_bytes'] / 1024:.1f} KB); live peak "
            f"{rep['live_peak_bytes']:,} B at {rep['peak_op']}; no reuse {rep['no_reuse_bytes']:,} B; "
            f"per-layer schedule (analysis, int8) "
            f"{rep['per_layer_peak_bytes']:,.0f} B → arena/per-layer {rep['arena_vs_per_layer']:.2f}; "
            f"{len(rep['inplace_ops'])} ops in place")
    t = Table(title=f"the {top} ops with the most live bytes")
    for col in ("op", "kind", "output", "live bytes"):
        t.add_column(col)
    for op in sorted(rep["ops"], key=lambda o: -o["live_bytes"])[:top]:
        t.add_row(op["name"], op["kind"], "×".join(map(str, op["out_shape"])), f"{op['live_bytes']:,}")
    c.print(t)


def _check_sram(args: argparse.Namespace, src: Any, gen: Any) -> None:
    from efficientml.core.errors import ConfigError

    if args.sram is None or gen.plan.arena_bytes <= args.sram * 1024:
        return
    best = gen.plan.arena_bytes
    if args.no_inplace:
        from efficientml.engine import generate

        best = min(best, generate(src.integer, _example(src), args.prefix).plan.arena_bytes)
    need = math.ceil(best / 1024 * 10) / 10        # KB, one decimal, rounded up: it fits
    how = " (with in-place reuse, i.e. without --no-inplace)" if best < gen.plan.arena_bytes else ""
    raise ConfigError(f"the arena needs {gen.plan.arena_bytes:,} bytes ({gen.plan.arena_bytes / 1024:.1f} KB), more "
                      f"than --sram {args.sram:g} KB; the smallest budget that fits is {need:g} KB{how}")


def run_build(args: argparse.Namespace) -> int:
    import contextlib
    import json
    from pathlib import Path

    from efficientml.core.errors import ConfigError
    from efficientml.core.outputs import check_output
    from efficientml.core.serialization import atomic_path

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {args.out!r} is a file; expected a folder for the generated C")
    with _flag("--prefix"):
        from efficientml.engine.codegen import check_prefix

        check_prefix(args.prefix)
    paths = [out / f"{args.prefix}{tail}" for tail in (".c", ".h", "_plan.json")]
    for p in paths:
        check_output(p, args.overwrite, flag="--out")
    src, gen = _generate(args)
    _check_sram(args, src, gen)
    rep = plan_report(src, gen)
    rep["files"] = [str(p) for p in paths]
    if args.sram is not None:
        rep["sram_budget_kb"] = args.sram
    texts = [gen.c_source, gen.header, json.dumps(rep, indent=2) + "\n"]
    with contextlib.ExitStack() as stack:          # all three or none: each renamed only if every write worked
        tmps = [stack.enter_context(atomic_path(p)) for p in paths]
        for tmp, text in zip(tmps, texts):
            tmp.write_text(text)
    if args.json:
        print_json(rep)
    else:
        _print_plan(rep)
        console().print(f"wrote {', '.join(map(str, paths))} ({len(gen.c_source) / 1e6:.1f} MB of C)")
    return 0


def run_host(args: argparse.Namespace) -> int:
    import sys

    from efficientml.analysis.latency import measure_latency

    src, eng = _generate(args, compile=True)
    gen = eng.generated
    x, said = src.inputs(args.samples)
    got, ref = eng.run(x), src.integer.integer_output(x)
    wrong = int((got != ref).sum())
    one = x[:1]
    codes = src.integer.program.instrs[0].step.integer(one)
    w, n = args.warmup, args.runs
    lat = {"engine_c": measure_latency(eng.run_codes, codes, warmup=w, runs=n),
           "torch_int8": measure_latency(src.integer.with_mode("fast"), one, warmup=w, runs=n, threads=args.threads),
           "torch_fp32": measure_latency(src.model, one, warmup=w, runs=n, threads=args.threads)}
    rep = {**plan_report(src, gen), "inputs": said, "bit_exact": wrong == 0, "mismatched_codes": wrong,
           "output_codes": ref.numel(), "library": str(eng.library),
           "latency_ms": {k: v.median_ms for k, v in lat.items()}, "latency": {k: v.to_dict() for k, v in lat.items()}}
    rep["engine_vs_torch_int8"] = lat["torch_int8"].median_ms / lat["engine_c"].median_ms
    rep["engine_vs_torch_fp32"] = lat["torch_fp32"].median_ms / lat["engine_c"].median_ms
    del rep["ops"]
    if args.json:
        print_json(rep)
    else:
        c = console()
        c.print(f"{src.name} at {'×'.join(map(str, src.input_shape))}: C engine vs Python integer reference on "
                f"{said}: " + ("bit-exact" if wrong == 0 else f"{wrong} of {ref.numel()} output codes differ"))
        c.print(f"latency (batch 1, median of {n}): engine C {lat['engine_c'].median_ms:.3f} ms, PyTorch int8 "
                f"{lat['torch_int8'].median_ms:.3f} ms, PyTorch fp32 {lat['torch_fp32'].median_ms:.3f} ms "
                f"({lat['torch_fp32'].threads} threads) → {rep['engine_vs_torch_int8']:.2f}× PyTorch int8")
        c.print(f"arena {gen.plan.arena_bytes:,} B; int8 calibrated on {src.calibration}")
    if wrong:
        print(f"efficientml: error: the engine's output differs from the integer reference in {wrong} of "
              f"{ref.numel()} codes", file=sys.stderr)
        return 1
    return 0


def run_mcu(args: argparse.Namespace) -> int:
    import sys
    import tempfile
    import time

    import torch

    from efficientml.engine.mcu import require_tools, run_on_mcu

    require_tools()                               # before the conversion: one sentence naming what to install
    src, gen = _generate(args)
    k = int(args.sample)
    x, _ = src.inputs(k + 1)
    what = f"{src.dataset} test image {k}" if src.dataset else f"random normal input {k} (seed 0)"
    if len(x) <= args.sample:
        from efficientml.core.errors import ConfigError

        raise ConfigError(f"--sample {k} is past the {len(x)} {src.dataset} test images")
    one = x[k:k + 1]
    codes = src.integer.program.instrs[0].step.integer(one)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="eml-mcu-") as tmp:
        res = run_on_mcu(gen, codes, tmp)
    secs = time.perf_counter() - t0
    ref = src.integer.integer_output(one)
    exact = bool(torch.equal(res.outputs, ref))
    flash_kb, sram_kb = res.flash_bytes / 1024, res.sram_bytes / 1024
    rep = {"model": src.name, "input_shape": list(src.input_shape), "calibration": src.calibration,
           "input": what, "board": "qemu-system-arm mps2-an385 (Cortex-M3)",
           "mcu_qemu_bitexact": exact, **res.to_dict(), "arena_bytes": gen.plan.arena_bytes,
           "fits_256kb_sram_1mb_flash": sram_kb <= BOARD_SRAM_KB and flash_kb <= BOARD_FLASH_KB,
           "build_and_run_s": secs}
    if args.json:
        print_json(rep)
    else:
        console().print(f"{src.name} on a Cortex-M3 (QEMU mps2-an385): Flash {flash_kb:.1f} KB, SRAM {sram_kb:.1f} KB "
                        f"(arena {gen.plan.arena_bytes / 1024:.1f} KB); "
                        + ("bit-exact" if exact else "outputs differ") + f" with the integer reference on "
                        f"{rep['input']} ({secs:.1f} s)")
    if not exact:
        print("efficientml: error: the firmware's output codes differ from the integer reference", file=sys.stderr)
        return 1
    return 0
