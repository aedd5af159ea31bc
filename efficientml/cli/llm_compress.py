"""``efficientml llm quantize`` and ``efficientml llm prune`` — thin over efficientml.llm.compress.

    efficientml llm quantize smollm2-135m --method awq --w-bits 4 --group-size 64 --out DIR
    efficientml llm prune smollm2-135m --method wanda --n-m 2:4 --out DIR
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


def register(llm_sub: argparse._SubParsersAction) -> None:
    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("model", help="smollm2-135m, a .gguf file, a Hugging Face model folder, or a Hub id "
                            "(owner/name[@revision], owner/name/file.gguf)")
        q.add_argument("--out", required=True, help="output folder (must not exist; written atomically)")
        add_overwrite_flag(q, "--out (only a folder holding nothing but files efficientml writes)")
        q.add_argument("--calib", default="wikitext2-valid",
                       help="calibration corpus (wikitext2-valid, tinyshakespeare, …) or a text file")
        q.add_argument("--calib-samples", type=positive_int, default=128)
        q.add_argument("--calib-len", type=positive_int, default=512)
        q.add_argument("--seed", type=int, default=0)
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
                   help="columns per scale, 'channel' (one scale per row), or auto (default: 128, else the "
                        "largest of 64, 32 that divides every layer's input width, e.g. 64 for smollm2-135m)")
    q.add_argument("--symmetric", action="store_true")
    q.add_argument("--act-order", action="store_true",
                   help="GPTQ, AWQ+GPTQ: columns by decreasing Hessian diagonal (static groups)")
    q.add_argument("--sink-share", type=fraction, default=None,
                   help="GPTQ, AWQ+GPTQ: share of each calibration sequence's Hessian weight on its first "
                        "token (the attention sink), in [0, 1); 0 = plain GPTQ (default: 0.05)")
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
              alpha="--alpha", sparsity="--sparsity", n_m="--n-m", method="--method")
_FLAGS["weight bits"] = "--w-bits"


def _config(args: argparse.Namespace, group_size: int | None):
    from efficientml.llm.compress import AWQConfig, GPTQConfig, RTNConfig, SmoothQuantConfig

    wq = dict(w_bits=args.w_bits, group_size=group_size, symmetric=args.symmetric)
    with flag_names(**_FLAGS):
        if args.method == "rtn":
            return RTNConfig(**wq)
        if args.method == "awq":
            return AWQConfig(**wq)
        keep_default = args.sink_share is None
        if args.method == "awq-gptq":
            sink = {} if keep_default else {"gptq_sink_share": args.sink_share}
            return AWQConfig(**wq, use_gptq=True, gptq_act_order=args.act_order, **sink)
        if args.method == "gptq":
            static = args.act_order and group_size is not None
            sink = {} if keep_default else {"sink_share": args.sink_share}
            return GPTQConfig(**wq, act_order=args.act_order, static_groups=static, **sink)
        return SmoothQuantConfig(alpha=args.alpha, smooth=not args.no_smooth, act=args.act)


def _prepare(args: argparse.Namespace) -> None:
    """Validate everything cheap before loading the model (so bad input fails in a second)."""
    import torch

    from efficientml.core.outputs import check_output

    check_output(args.out, args.overwrite, folder=True, flag="--out")
    if args.threads:
        torch.set_num_threads(args.threads)


def _open(args: argparse.Namespace):
    """The opened source and its config, checked against --calib-len (before the weights load)."""
    from efficientml.core.errors import ConfigError
    from efficientml.llm.io.load import load_config
    from efficientml.llm.io.source import open_source

    if Path(args.calib).exists():  # a text file: refuse one that is not UTF-8 now, not after the load
        from efficientml.data.text import load_text

        load_text(args.calib)
    src = open_source(args.model)
    cfg = load_config(src)
    if args.calib_len > cfg.max_position_embeddings:
        raise ConfigError(f"--calib-len {args.calib_len} is longer than the model's {cfg.max_position_embeddings} "
                          "positions; use at most that")
    return src, cfg


def _loaded(src):
    from efficientml.cli.model_source import warn_not_finite
    from efficientml.llm.io.load import load

    model, tok = load(src)
    warn_not_finite(model, "the model")
    return model, tok


def _auto_group(args: argparse.Namespace, cfg) -> int | None:
    """--group-size auto → 128, or the largest of 64, 32, 16 dividing hidden and intermediate sizes;
    an explicit size that does not divide them is refused here, naming the sizes that do."""
    from efficientml.core.errors import ConfigError

    widths = {cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.dim_per_head}
    fits = [g for g in (128, 64, 32, 16) if all(w % g == 0 for w in widths)]
    if args.group_size == AUTO_GROUP:
        if args.method == "smoothquant":
            return None
        if not fits:
            raise ConfigError(f"no group size of 128, 64, 32 or 16 divides the layer widths {sorted(widths)}; "
                              "give --group-size channel")
        return fits[0]
    if args.group_size is not None and any(w % args.group_size for w in widths):
        raise ConfigError(f"--group-size {args.group_size} does not divide the layer widths {sorted(widths)}; "
                          f"use --group-size {fits[0] if fits else 'channel'}" + (" or channel" if fits else ""))
    return args.group_size


def _calib(args: argparse.Namespace, tok, needed: bool):
    from efficientml.llm.compress import CalibConfig, calibration_tokens

    if not needed:
        return None, None
    cc = CalibConfig(args.calib, args.calib_samples, args.calib_len, args.seed)
    return calibration_tokens(tok, cc), cc


def _report(args: argparse.Namespace, rep: dict) -> None:
    if args.json:
        print_json(rep)
        return
    print(f"{rep['method']}: {rep['seconds']:.1f} s → {args.out}")


def run_quantize(args: argparse.Namespace) -> int:
    import torch

    from efficientml.core.transform import apply
    from efficientml.llm.compress import save_compressed
    from efficientml.llm.io.generation_config import generation_defaults

    _config(args, 128 if args.group_size == AUTO_GROUP else args.group_size)  # bad bits fail before loading
    _prepare(args)
    src, cfg = _open(args)  # resolved once: the weights and the sampling defaults
    conf = _config(args, _auto_group(args, cfg))
    model, tok = _loaded(src)
    calib, cc = _calib(args, tok, args.method != "rtn")
    with flag_names(**_FLAGS):
        rep = apply(model, conf, calib=calib, inplace=True, batch_size=args.batch_size, device=args.device).report
    rep["calibration"] = None if cc is None else cc.to_dict()
    rep["model"] = args.model
    save_compressed(model.cpu(), tok, args.out, overwrite=args.overwrite,
                    float_dtype=getattr(torch, args.float_dtype), recipe=json.loads(json.dumps(rep, default=str)),
                    sampling=generation_defaults(src))
    _report(args, rep)
    return 0


def run_prune(args: argparse.Namespace) -> int:
    from efficientml.core.transform import apply
    from efficientml.llm.compress import LLMPruneConfig
    from efficientml.llm.io.generation_config import generation_defaults
    from efficientml.llm.io.load import save_hf

    with flag_names(**_FLAGS):
        conf = LLMPruneConfig(args.method, args.sparsity, n_m=args.n_m)
    _prepare(args)
    src, _ = _open(args)
    model, tok = _loaded(src)
    calib, cc = _calib(args, tok, args.method != "magnitude")
    with flag_names(**_FLAGS):
        rep = apply(model, conf, calib=calib, inplace=True, batch_size=args.batch_size, device=args.device).report
    rep["calibration"] = None if cc is None else cc.to_dict()
    save_hf(model.cpu(), tok, args.out, overwrite=args.overwrite, sampling=generation_defaults(src))
    _report(args, rep)
    return 0
