"""``efficientml llm quantize`` and ``efficientml llm prune`` — thin over efficientml.llm.compress.

    efficientml llm quantize smollm2-135m --method gptq --w-bits 3 --out DIR   # the recipe, group 64
    efficientml llm prune smollm2-135m --method wanda --n-m 2:4 --out DIR

Every default of ``quantize`` (calibration set, GPTQ's act-order / damping / sink share / propagation,
AWQ's searches, the group size) comes from :mod:`efficientml.llm.compress.recipe`, the table the
benchmark's rows are built from; the report prints the recipe that ran.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from efficientml.cli.common import add_overwrite_flag, device, flag_names, fraction, positive_int, print_json

METHODS = ("rtn", "awq", "gptq", "awq-gptq", "smoothquant")


def _group_size(s: str) -> int | None:
    if s.lower() in ("channel", "none"):
        return None
    if s.lower() == "auto":
        return AUTO_GROUP
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, 'channel' or 'auto', got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, 'channel' (one scale per output row) or "
                                         f"'auto', got {s!r}")
    return v


AUTO_GROUP = -1  # --group-size auto: the largest of 128, 64, 32 that divides every linear's input width


def _n_m(s: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in s.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N:M such as 2:4, got {s!r}") from None
    if not 0 < n < m:
        raise argparse.ArgumentTypeError(f"expected N:M with 0 < N < M, such as 2:4, got {s!r}")
    return n, m


def _unit(s: str) -> float:
    from efficientml.cli.common import number

    return number("a number in [0, 1]", 0, 1)(s)


def _damp(s: str) -> float:
    from efficientml.cli.common import number

    v = number("a number in (0, 1)", 0, 1, low_open=True)(s)
    if v == 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {s!r}")
    return v


def register(llm_sub: argparse._SubParsersAction) -> None:
    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("model", help="smollm2-135m, a .gguf file, a Hugging Face model folder, or a Hub id "
                            "(owner/name[@revision], owner/name/file.gguf)")
        q.add_argument("--out", required=True, help="output folder (must not exist; written atomically)")
        add_overwrite_flag(q, "--out (only a folder holding nothing but files efficientml writes)")
        q.add_argument("--calib", default=None,
                       help="calibration corpus (wikitext2-valid, tinyshakespeare-train, …) or a text file; several "
                            "joined by commas mix them sample by sample (default: the recipe's, wikitext2-valid)")
        q.add_argument("--calib-samples", type=positive_int, default=None,
                       help="calibration windows (default: the recipe's)")
        q.add_argument("--calib-len", type=positive_int, default=None, help="tokens per window (default: the recipe's)")
        q.add_argument("--seed", type=int, default=None, help="where the windows start (default: the recipe's)")
        q.add_argument("--batch-size", type=positive_int, default=8)
        q.add_argument("--device", type=device, default="cpu", help="where each block is processed: cpu or cuda")
        q.add_argument("--threads", type=positive_int, default=None, help="CPU threads (torch)")
        q.add_argument("--json", action="store_true", help="print the report as JSON")

    q = llm_sub.add_parser("quantize", help="quantize (RTN, AWQ, GPTQ, AWQ+GPTQ, SmoothQuant W8A8) and save packed",
                           description="Quantize every decoder-block linear, calibrating one block at a time, "
                                       "and save a compressed-tensors checkpoint (pack-quantized or int-quantized).")
    common(q)
    q.add_argument("--method", choices=METHODS, default="awq")
    q.add_argument("--w-bits", type=int, default=4)
    q.add_argument("--group-size", type=_group_size, default=AUTO_GROUP,
                   help="columns per scale, 'channel' (one scale per row), or auto (default): the largest of 128, "
                        "64, 32 that divides every quantized linear's input width, e.g. 64 for smollm2-135m")
    q.add_argument("--symmetric", action="store_true")
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ, AWQ+GPTQ: columns by decreasing Hessian diagonal, static groups (default: on)")
    q.add_argument("--damp", type=_damp, default=None,
                   help="GPTQ, AWQ+GPTQ: dampening, a fraction of the mean Hessian diagonal, in (0, 1) "
                        "(default: the recipe's)")
    q.add_argument("--sink-share", type=fraction, default=None,
                   help="GPTQ, AWQ+GPTQ: share of each calibration sequence's Hessian weight on its first "
                        "token (the attention sink), in [0, 1); 0 = plain GPTQ (default: the recipe's)")
    q.add_argument("--sink-rule", choices=("tokens", "trace"), default=None,
                   help="GPTQ, AWQ+GPTQ: that share of the sequence's tokens, or of each Hessian's trace (up or "
                        "down: the sink's massive activations already dominate some layers; default: the recipe's)")
    q.add_argument("--propagate", choices=("fp", "quantized"), default=None,
                   help="GPTQ: each block's calibration inputs from the fp model or the quantized blocks "
                        "(default: the recipe's, fp)")
    q.add_argument("--alpha", type=_unit, default=0.5, help="SmoothQuant migration strength, in [0, 1]")
    q.add_argument("--act", choices=("dynamic", "static"), default="dynamic", help="SmoothQuant activations")
    q.add_argument("--no-smooth", action="store_true", help="SmoothQuant: W8A8 without smoothing")
    q.add_argument("--float-dtype", choices=("float32", "float16", "bfloat16"), default="float16",
                   help="dtype of the unquantized tensors (embeddings, norms) in the checkpoint")
    q.set_defaults(func=run_quantize)

    q = llm_sub.add_parser("prune", help="prune (magnitude, Wanda, SparseGPT; unstructured or N:M) and save",
                           description="Prune every decoder-block linear and save a Hugging Face folder.")
    common(q)
    q.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt"), default="wanda")
    q.add_argument("--sparsity", type=fraction, default=0.5, help="fraction of weights removed, in [0, 1)")
    q.add_argument("--n-m", type=_n_m, default=None, help="N:M sparsity, e.g. 2:4")
    q.set_defaults(func=run_prune)


_FLAGS = {"group_size=None": "--group-size channel"}
_FLAGS.update(w_bits="--w-bits", group_size="--group-size", symmetric="--symmetric", act_order="--act-order",
              gptq_act_order="--act-order", sink_share="--sink-share", gptq_sink_share="--sink-share",
              damp="--damp", gptq_damp="--damp", propagate="--propagate", sink_rule="--sink-rule",
              gptq_sink_rule="--sink-rule",
              alpha="--alpha", sparsity="--sparsity", n_m="--n-m", method="--method")
_FLAGS["weight bits"] = "--w-bits"
_GPTQ_FLAGS = {"act_order": "--act-order", "damp": "--damp", "sink_share": "--sink-share", "sink_rule": "--sink-rule",
               "propagate": "--propagate"}


def _gptq_overrides(args: argparse.Namespace) -> dict:
    """The GPTQ knobs given on the command line, as fields of the method's config (the rest: the recipe)."""
    from efficientml.core.errors import ConfigError

    given = {k: getattr(args, k) for k in _GPTQ_FLAGS if getattr(args, k, None) is not None}
    if given and args.method not in ("gptq", "awq-gptq"):
        raise ConfigError(f"{_GPTQ_FLAGS[next(iter(given))]} applies to --method gptq or awq-gptq, not {args.method}")
    if args.method == "gptq" and "act_order" in given:
        given["static_groups"] = given["act_order"]  # act-order keeps groups in the packed layout's order
    if args.method != "awq-gptq":
        return given
    if "propagate" in given:
        raise ConfigError("--propagate applies to --method gptq; AWQ+GPTQ calibrates on the fp model's activations")
    return {f"gptq_{k}": v for k, v in given.items()}


def _config(args: argparse.Namespace, group_size: int | None):
    """The method's recipe (efficientml.llm.compress.recipe) at these bits and group, with the flags given."""
    from efficientml.llm.compress import SmoothQuantConfig
    from efficientml.llm.compress.recipe import recipe

    with flag_names(**_FLAGS):
        if args.method == "smoothquant":
            return SmoothQuantConfig(alpha=args.alpha, smooth=not args.no_smooth, act=args.act)
        return recipe(args.method, args.w_bits, group_size, args.symmetric, **_gptq_overrides(args))


def _calib_config(args: argparse.Namespace):
    """The calibration set: the recipe's, with the --calib* / --seed flags given."""
    from efficientml.llm.compress.calib import CalibConfig
    from efficientml.llm.compress.recipe import CALIB

    pick = lambda v, d: d if v is None else v  # noqa: E731
    return CalibConfig(pick(args.calib, CALIB.source), pick(args.calib_samples, CALIB.n_samples),
                       pick(args.calib_len, CALIB.seq_len), pick(args.seed, CALIB.seed))


def _prepare(args: argparse.Namespace) -> None:
    """Validate everything cheap before loading the model (so bad input fails in a second)."""
    import torch

    from efficientml.core.outputs import check_output

    check_output(args.out, args.overwrite, folder=True, flag="--out")
    if args.threads:
        torch.set_num_threads(args.threads)


def _open(args: argparse.Namespace, calibrated: bool = True):
    """The opened source, its config and the calibration set, checked against each other (before the
    weights load): text files readable, windows no longer than the model's positions (``calibrated``:
    the method reads calibration text; RTN and magnitude pruning do not)."""
    from efficientml.core.errors import ConfigError
    from efficientml.data.text import known_text, load_text
    from efficientml.llm.io.load import load_config
    from efficientml.llm.io.source import open_source

    cc = _calib_config(args)
    for name in cc.sources if calibrated else ():
        if not known_text(name):  # a text file: refuse a missing or non-UTF-8 one now, not after the load
            load_text(name)
    src = open_source(args.model)
    cfg = load_config(src)
    if calibrated and cc.seq_len > cfg.max_position_embeddings:
        raise ConfigError(f"--calib-len {cc.seq_len} is longer than the model's {cfg.max_position_embeddings} "
                          "positions; use at most that")
    return src, cfg, cc


def _loaded(src):
    from efficientml.cli.model_source import warn_not_finite
    from efficientml.llm.io.load import load

    model, tok = load(src)
    warn_not_finite(model, "the model")
    return model, tok


def _auto_group(args: argparse.Namespace, cfg) -> int | None:
    """--group-size auto → the largest of 128, 64, 32 dividing every quantized linear's input width; an
    explicit size that does not divide them is refused here, naming the size that does."""
    from efficientml.core.errors import ConfigError
    from efficientml.llm.compress.recipe import GROUP_CANDIDATES, default_group_size, quantized_widths

    widths = list(quantized_widths(cfg))
    fit = default_group_size(widths)
    if args.group_size == AUTO_GROUP:
        if args.method == "smoothquant":
            return None
        if fit is None:
            raise ConfigError(f"no group size of {', '.join(map(str, GROUP_CANDIDATES))} divides the layer widths "
                              f"{widths}; give --group-size channel or a size that divides them")
        return fit
    if args.group_size is not None and any(w % args.group_size for w in widths):
        raise ConfigError(f"--group-size {args.group_size} does not divide the layer widths {widths}; "
                          f"use --group-size {fit or 'channel'}" + (" or channel" if fit else ""))
    return args.group_size


def resolved_config(args: argparse.Namespace, model_config):
    """What ``llm quantize`` runs for these parsed arguments on a model with this config: the method's
    config (the recipe with the flags given, the group size resolved) and the calibration set."""
    return _config(args, _auto_group(args, model_config)), _calib_config(args)


def _calib(tok, cc, needed: bool):
    from efficientml.llm.compress import calibration_tokens

    return (calibration_tokens(tok, cc), cc) if needed else (None, None)


def _report(args: argparse.Namespace, rep: dict) -> None:
    if args.json:
        print_json(rep)
        return
    print(f"recipe: {rep['recipe']}")
    print(f"{rep['method']}: {rep['seconds']:.1f} s → {args.out}")


def run_quantize(args: argparse.Namespace) -> int:
    import torch

    from efficientml.core.transform import apply
    from efficientml.llm.compress import save_compressed
    from efficientml.llm.compress.recipe import describe
    from efficientml.llm.io.generation_config import generation_defaults

    _config(args, 64 if args.group_size == AUTO_GROUP else args.group_size)  # bad bits fail before loading
    _prepare(args)
    src, cfg, cc = _open(args, args.method != "rtn")  # resolved once: the weights and the sampling defaults
    conf, cc = resolved_config(args, cfg)
    model, tok = _loaded(src)
    calib, cc = _calib(tok, cc, args.method != "rtn")
    with flag_names(**_FLAGS):
        rep = apply(model, conf, calib=calib, inplace=True, batch_size=args.batch_size, device=args.device).report
    rep["calibration"] = None if cc is None else cc.to_dict()
    rep["recipe"] = describe(conf, cc, args.method)
    rep["model"] = args.model
    save_compressed(model.cpu(), tok, args.out, overwrite=args.overwrite,
                    float_dtype=getattr(torch, args.float_dtype), recipe=json.loads(json.dumps(rep, default=str)),
                    sampling=generation_defaults(src))
    _report(args, rep)
    return 0


def run_prune(args: argparse.Namespace) -> int:
    from efficientml.core.transform import apply
    from efficientml.llm.compress import LLMPruneConfig
    from efficientml.llm.compress.recipe import describe
    from efficientml.llm.io.generation_config import generation_defaults
    from efficientml.llm.io.load import save_hf

    with flag_names(**_FLAGS):
        conf = LLMPruneConfig(args.method, args.sparsity, n_m=args.n_m)
    _prepare(args)
    src, _, cc = _open(args, args.method != "magnitude")
    model, tok = _loaded(src)
    calib, cc = _calib(tok, cc, args.method != "magnitude")
    with flag_names(**_FLAGS):
        rep = apply(model, conf, calib=calib, inplace=True, batch_size=args.batch_size, device=args.device).report
    rep["calibration"] = None if cc is None else cc.to_dict()
    rep["recipe"] = describe(conf, cc, args.method)
    save_hf(model.cpu(), tok, args.out, overwrite=args.overwrite, sampling=generation_defaults(src))
    _report(args, rep)
    return 0
