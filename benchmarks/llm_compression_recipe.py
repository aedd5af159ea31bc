"""The weight table's rows as recipe configs, and the parts ``ood`` and ``calib_ablation`` of
benchmarks/llm_compression.py (issue 25), with their targets.

Every table row is ``row_config(method, setting)`` = ``recipe(method, bits, group)`` of
efficientml.llm.compress.recipe, the table ``efficientml llm quantize`` takes its defaults from.

``ood``:
  1. the CLI's defaults, by its own code: ``llm quantize smollm2-135m --method M --w-bits B`` (plus
     ``--group-size channel --symmetric`` for the per-channel setting; no ``--group-size`` otherwise, so the
     default group is chosen from the model's widths) parsed by the CLI's parser and resolved by
     :func:`efficientml.cli.llm_compress.resolved_config`, compared with the row's config and the
     benchmark's calibration set;
  2. the recipe's knobs one at a time (GPTQ: damping 0.01 and 0.3, act-order off, sink share 0, quantized
     propagation, min/max groups; AWQ+GPTQ: damping 0.01, act-order off, min/max groups) at W4 g64 and
     W3 g64, on both texts. The recipe is
     the best when no such row has a higher mean gap closed over the two texts and the two settings.
``calib_ablation``: the calibration set varied — WikiText-2 valid, TinyShakespeare's train split, the two
mixed sample by sample, at the recipe's 128 samples, and 32/64/128/256 WikiText-2 samples (``--calib-grid
full``: every source at every size) — for AWQ, GPTQ and AWQ+GPTQ at every setting, on both texts; RTN
(no calibration) is the table's row.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

SETTINGS = {"w4g64": dict(w_bits=4, group_size=64, symmetric=False),
            "w3g64": dict(w_bits=3, group_size=64, symmetric=False),
            "w4pc_sym": dict(w_bits=4, group_size=None, symmetric=True)}
RECIPE_NAMES = {"rtn": "rtn", "awq": "awq", "gptq": "gptq", "awq+gptq": "awq-gptq"}  # table row → --method
METHODS = ("awq", "gptq", "awq+gptq")
ABLATION_SETTINGS = ("w4g64", "w3g64")
# a row that changes one knob of a method's recipe: name → (method, config overrides)
VARIANTS = {
    "gptq[damp=0.01]": ("gptq", {"damp": 0.01}),
    "gptq[damp=0.3]": ("gptq", {"damp": 0.3}),
    "gptq[act_order=False]": ("gptq", {"act_order": False, "static_groups": False}),
    "gptq[sink_share=0]": ("gptq", {"sink_share": 0.0}),
    "gptq[propagate=quantized]": ("gptq", {"propagate": "quantized"}),
    "gptq[grid=minmax]": ("gptq", {"grid": "minmax"}),
    "awq+gptq[gptq_damp=0.01]": ("awq+gptq", {"gptq_damp": 0.01}),
    "awq+gptq[gptq_act_order=False]": ("awq+gptq", {"gptq_act_order": False}),
    "awq+gptq[gptq_grid=minmax]": ("awq+gptq", {"gptq_grid": "minmax"}),
}
TEXTS = {"wikitext2": "ppl", "tinyshakespeare": "ppl_ood"}
SOURCES = {"wikitext2": "wikitext2-valid", "tinyshakespeare": "tinyshakespeare-train",
           "mixed": "wikitext2-valid,tinyshakespeare-train"}


def row_config(meth: str, sname: str, **overrides):
    """The config of a table row: the method's recipe at the setting's bits and group."""
    from efficientml.llm.compress.recipe import recipe

    return recipe(RECIPE_NAMES[meth], **SETTINGS[sname], **overrides)


def cli_argv(meth: str, sname: str) -> list[str]:
    """The command a user types for this row (less --out): method and bits, plus the per-channel flags."""
    wq = SETTINGS[sname]
    argv = ["llm", "quantize", "smollm2-135m", "--method", RECIPE_NAMES[meth], "--w-bits", str(wq["w_bits"])]
    if wq["group_size"] is None:
        argv += ["--group-size", "channel"]
    if wq["symmetric"]:
        argv.append("--symmetric")
    return argv


def cli_check(model_config, calib_cfg) -> dict:
    """Each row's config as the CLI resolves it for its command, against the benchmark's."""
    from efficientml.cli.llm_compress import resolved_config
    from efficientml.cli.main import build_parser

    parser = build_parser()
    rows, calib = {}, None
    for meth in RECIPE_NAMES:
        for sname in SETTINGS:
            argv = cli_argv(meth, sname)
            conf, calib = resolved_config(parser.parse_args(argv + ["--out", "unused"]), model_config)
            table = row_config(meth, sname)
            rows[f"{meth}_{sname}"] = {"command": "efficientml " + " ".join(argv), "cli": conf.to_dict(),
                                       "equal": conf == table}
    return {"rows": rows, "configs_equal": all(r["equal"] for r in rows.values()),
            "cli_calibration": calib.to_dict(), "calibration_equal": calib == calib_cfg}


def table_stats(st):
    """Statistics (mean |x|, search samples, Hessians) of the table's calibration set: the calib part's
    files when this run wrote them, else one AWQ+GPTQ pass (kept for the other parts of the run)."""
    if st.stats_ready:
        return st.load_stats()
    if getattr(st, "_table_stats", None) is None:
        st._table_stats = collect_stats(st, st.calib)[0]
    return st._table_stats


def collect_stats(st, calib: torch.Tensor):
    """One calibration pass of the AWQ+GPTQ recipe at W4 g64 keeping its statistics: (stats, that row's model)."""
    from efficientml.core.transform import apply

    m = copy.deepcopy(st.base)
    rep = apply(m, row_config("awq+gptq", "w4g64"), calib=calib, inplace=True, pack=False, progress=False,
                keep_stats=True).report
    return rep["stats"], m


def quantize_row(st, conf, stats, calib: torch.Tensor, cache: dict | None = None, pool: dict | None = None):
    """A copy of the fp model quantized with ``conf``: from ``stats`` where they serve (fp propagation, the
    same sink share); a GPTQ with another sink share from statistics of its own (one calibration pass,
    kept in ``pool`` by sink share); quantized propagation with its own pass every time."""
    from efficientml.core.transform import apply
    from efficientml.llm.compress import GPTQConfig, RTNConfig

    m = copy.deepcopy(st.base)
    kw = dict(inplace=True, pack=False, progress=False)
    if isinstance(conf, RTNConfig):
        apply(m, conf, calib=None, **kw)
    elif isinstance(conf, GPTQConfig) and conf.propagate != "fp":
        apply(m, conf, calib=calib, **kw)
    elif isinstance(conf, GPTQConfig) and (conf.sink_share, conf.sink_rule) != (stats.sink_share, stats.sink_rule):
        pool, key = {} if pool is None else pool, (conf.sink_share, conf.sink_rule)
        if key in pool:
            apply(m, conf, stats=pool[key], **kw)
        else:
            pool[key] = apply(m, conf, calib=calib, keep_stats=True, **kw).report["stats"]
    else:
        apply(m, conf, stats=stats, search_cache=cache, **kw)
    return m


def ensure_rows(st, methods, settings) -> None:
    """The fp row and the table rows these parts compare against, computed here if this run has not."""
    R = st.R
    if "fp" not in R["ppl_ood"]:
        st.fp = st.ppl(st.base, "fp", ood=True)
    for sname in settings:
        cache: dict = {}
        for meth in methods:
            if f"{meth}_{sname}" not in R["ppl_ood"]:
                stats = None if meth == "rtn" else table_stats(st)
                m = quantize_row(st, row_config(meth, sname), stats, st.calib, cache)
                st.ppl(m, f"{meth}_{sname}", ood=True)
                del m


def part_ood(st) -> None:
    """The CLI check and the one-knob rows (module docstring)."""
    st.R["recipe_check"] = cli_check(st.base.config, st.calib_cfg)
    ensure_rows(st, ("rtn", *METHODS), ABLATION_SETTINGS)
    abl = st.R["ood_ablation"] = {"variants": {k: {"method": m, "overrides": o} for k, (m, o) in VARIANTS.items()},
                                  "settings": list(ABLATION_SETTINGS), "ppl": {}, "ppl_ood": {}}
    stats, pool = table_stats(st), {}
    for sname in ABLATION_SETTINGS:
        for name, (meth, over) in VARIANTS.items():
            m = quantize_row(st, row_config(meth, sname, **over), stats, st.calib, pool=pool)
            st.ppl(m, f"{name}_{sname}", ood=True, where=abl)
            del m
    st.save()


def calib_sets(st) -> dict:
    """name → CalibConfig of the calibration ablation (the table's set among them)."""
    base = st.calib_cfg
    sizes = [int(x) for x in (st.args.calib_sizes or ("2,4" if st.args.quick else "32,64,128,256")).split(",")]
    pairs = [(src, base.n_samples) for src in SOURCES] + [("wikitext2", n) for n in sizes]
    if st.args.calib_grid == "full":
        pairs += [(src, n) for src in SOURCES for n in sizes]
    sets = {}
    for src, n in pairs:
        sets.setdefault(f"{src}@{n}", dataclasses.replace(base, source=SOURCES[src], n_samples=n))
    return sets


def part_calib_ablation(st) -> None:
    """Every method and setting calibrated on each set of :func:`calib_sets`, on both texts."""
    from efficientml.llm.compress import calibration_tokens

    ensure_rows(st, ("rtn",), SETTINGS)
    sets = calib_sets(st)
    ab = st.R["calib_ablation"] = {"sets": {k: v.to_dict() for k, v in sets.items()}, "ppl": {}, "ppl_ood": {}}
    for name, cc in sets.items():
        if cc == st.calib_cfg:  # the table's own calibration: its rows
            ensure_rows(st, METHODS, SETTINGS)
            for key in TEXTS.values():
                ab[key].update({f"{name}/{r}_{s}": st.R[key][f"{r}_{s}"] for r in METHODS for s in SETTINGS})
            continue
        calib = calibration_tokens(st.tok, cc)
        stats, first = collect_stats(st, calib)  # `first`: the AWQ+GPTQ W4 g64 row of this set
        st.ppl(first, f"{name}/awq+gptq_w4g64", ood=True, where=ab)
        del first
        for sname in SETTINGS:
            cache: dict = {}  # AWQ's searched scales, reused by AWQ+GPTQ
            for meth in METHODS:
                if f"{name}/{meth}_{sname}" not in ab["ppl"]:
                    m = quantize_row(st, row_config(meth, sname), stats, calib, cache)
                    st.ppl(m, f"{name}/{meth}_{sname}", ood=True, where=ab)
                    del m
        del stats
    st.save()


def gap(fp: float | None, rtn: float | None, v: float | None) -> float | None:
    """(ppl_RTN − ppl) / (ppl_RTN − ppl_fp); None when a number is missing or RTN is not above fp."""
    return (rtn - v) / (rtn - fp) if None not in (fp, rtn, v) and rtn > fp else None


def _gaps(R: dict, rows: dict, names: list[str], settings) -> dict:
    """{name: {setting: {text: gap closed}}} for rows held in ``rows`` (ppl / ppl_ood dicts), with the fp and
    RTN rows of the table."""
    out = {}
    for name in names:
        out[name] = {s: {t: gap(R.get(k, {}).get("fp"), R.get(k, {}).get(f"rtn_{s}"),
                                rows.get(k, {}).get(f"{name}_{s}")) for t, k in TEXTS.items()} for s in settings}
    return out


def _mean(g: dict) -> float | None:
    vals = [v for per in g.values() for v in per.values()]
    return None if not vals or None in vals else sum(vals) / len(vals)


def best_recipe(R: dict) -> dict:
    """Per method with variants: each row's mean gap closed (two texts × the ablation settings) and the best."""
    abl = R.get("ood_ablation", {})
    out = {}
    for meth in sorted({m for m, _ in VARIANTS.values()}):
        names = [n for n, (m, _) in VARIANTS.items() if m == meth]
        scores = {meth: _mean(_gaps(R, R, [meth], ABLATION_SETTINGS)[meth])}
        scores.update({n: _mean(g) for n, g in _gaps(R, abl, names, ABLATION_SETTINGS).items()})
        done = None not in scores.values()
        out[meth] = {"mean_gap_closed": scores, "best": max(scores, key=scores.get) if done else None,
                     "recipe_is_best": (max(scores, key=scores.get) == meth) if done else None}
    return out


def ood_targets(rec) -> None:
    """Issue 25's targets from the merged results (every number they use is in results)."""
    R = rec.results
    gaps = _gaps(R, R, list(METHODS), SETTINGS)
    R["gap_closed_ood"] = {s: {m: gaps[m][s]["tinyshakespeare"] for m in METHODS} for s in SETTINGS}
    for sname, thr in (("w3g64", 0.40), ("w4g64", 0.30)):
        for meth in ("awq", "gptq"):
            v = gaps[meth][sname]["tinyshakespeare"]
            rec.target(f"{meth}_gap_closed_ood_{sname}", v, ">=", thr,
                       note=f"(ppl_RTN − ppl_{meth}) / (ppl_RTN − ppl_fp) on TinyShakespeare (val split, results."
                            f"ppl_ood), calibrated on WikiText-2 valid with the CLI's defaults at {sname}"
                            + ("" if v is not None else "; rows missing from results.ppl_ood"))
    if "calib_ablation" in R:
        ab = R["calib_ablation"]
        ab["gap_closed"] = _gaps(R, ab, [f"{n}/{m}" for n in ab["sets"] for m in METHODS], SETTINGS)
    best = R["best_recipe"] = best_recipe(R)
    chk = R.get("recipe_check", {})
    parts = [chk.get("configs_equal"), chk.get("calibration_equal")] + [b["recipe_is_best"] for b in best.values()]
    value = None if None in parts else all(parts)
    rec.target("defaults_equal_best_recipe", value, "==", True,
               note="the CLI's parsed configs and calibration equal every table row's (results.recipe_check) and no "
                    "one-knob variant of GPTQ or AWQ+GPTQ has a higher mean gap closed over WikiText-2 and "
                    "TinyShakespeare at W4/W3 g64 (results.best_recipe)"
                    + ("" if value is not None else "; parts ood or table rows missing"))
