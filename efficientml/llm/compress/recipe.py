"""The default recipe of each weight-only method: one table that ``efficientml llm quantize`` takes its
defaults from and that benchmarks/llm_compression.py builds its table rows from, so a command with only
``--method``, ``--w-bits`` and ``--group-size`` runs exactly a row of the benchmark (tests/llm/compress/
test_recipe.py parses the CLI and compares).

    conf = recipe("gptq", w_bits=3, group_size=64)        # GPTQConfig(3, 64, act_order=True, …)
    g = default_group_size(quantized_widths(model))        # 64 for SmolLM2-135M (widths 576, 1536)

Why each entry (SmolLM2-135M; benchmarks/results/llm_compression.json, parts ``ood`` and
``calib_ablation``, hold the rows that vary one knob of the recipe at a time):

- calibration: 128 windows × 512 tokens of WikiText-2 *valid* (seed 0), the benchmark's set.
- GPTQ: act-order with static groups (the packed layout's column order; plain column order ended above
  RTN's perplexity at W4 and W3); ``sink_share`` 0.05 (each sequence's first token, the attention
  sink, carries 5 % of its Hessian weight: plain GPTQ leaves that token's error far above RTN's, see
  stats.py); ``damp`` 0.1 of the mean Hessian diagonal instead of the paper's 0.01: with 0.01 the
  layer output error on text unlike the calibration set (TinyShakespeare after WikiText-2) stays
  close to RTN's, GPTQ having moved the rounding error into input directions the calibration text
  rarely uses; 0.1 keeps the in-domain error (layer-local probe: 0.40 vs 0.40 of RTN's) and lowers
  the out-of-domain one (0.75 vs 0.92 of RTN's, W3 g64, first blocks); ``propagate="fp"``: every
  block sees the fp model's activations, so one calibration pass serves every bit width and group;
  ``grid="mse"``: each group's range shrunk to the weight-MSE optimum (quant.grid.qparams_mse) before
  the column loop. With min/max groups GPTQ closed 63 % of RTN's gap on WikiText-2 at W3 g64 but only
  16 % on TinyShakespeare (69.8 vs RTN 77.4, fp 29.9): the outlier-stretched min/max grid wastes levels,
  and GPTQ's compensation repairs that only along the calibration text's input directions. The MSE
  grid needs no data, so it helps on every text (W3 g64: 53.1 on TinyShakespeare, 44.9 on WikiText-2).
  Per output channel (no groups) GPTQ keeps min/max: a row's range there is set by its few salient
  weights, and clipping them cost W4 per-channel symmetric 41.4 → 49.0 on WikiText-2 (AWQ+GPTQ, whose
  scales protect those channels first, gains from the MSE grid there too: 39.5 → 37.0).
- AWQ: the α grid of 20, the clip search on 512 tokens, the α and clip searches on 2 sequences.
- AWQ+GPTQ: AWQ's scales, then GPTQ with the GPTQ entries above (no activation-aware clip search; the
  MSE grid instead).
- group size: the largest of 128, 64, 32 dividing every quantized linear's input width.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from efficientml.core.config import Config
from efficientml.core.errors import ConfigError
from efficientml.llm.compress.awq import AWQConfig
from efficientml.llm.compress.calib import CalibConfig
from efficientml.llm.compress.gptq import GPTQConfig
from efficientml.llm.compress.rtn import RTNConfig

GROUP_CANDIDATES: tuple[int, ...] = (128, 64, 32)
CALIB = CalibConfig(source="wikitext2-valid", n_samples=128, seq_len=512, seed=0)

GPTQ_RECIPE: dict[str, Any] = dict(act_order=True, static_groups=True, damp=0.1, sink_share=0.05, propagate="fp",
                                   grid="mse")
AWQ_RECIPE: dict[str, Any] = dict(n_grid=20, search_samples=2, clip_grid=20, clip_tokens=512)
AWQ_GPTQ_RECIPE: dict[str, Any] = dict(AWQ_RECIPE, use_gptq=True, gptq_act_order=True,
                                       gptq_damp=GPTQ_RECIPE["damp"], gptq_sink_share=GPTQ_RECIPE["sink_share"],
                                       gptq_grid=GPTQ_RECIPE["grid"])

# method name (the CLI's --method) → (config class, the recipe's fields beyond bits/group/symmetric)
RECIPES: dict[str, tuple[type[Config], dict[str, Any]]] = {
    "rtn": (RTNConfig, {}),
    "awq": (AWQConfig, AWQ_RECIPE),
    "gptq": (GPTQConfig, GPTQ_RECIPE),
    "awq-gptq": (AWQConfig, AWQ_GPTQ_RECIPE),
}


def recipe(method: str, w_bits: int = 4, group_size: int | None = 64, symmetric: bool = False,
           **overrides: Any) -> Config:
    """The config ``method`` runs by default at this bit width and group size (``None``: one scale per
    output channel); ``overrides`` replace recipe fields (a GPTQ ``act_order`` without static groups is
    refused by GPTQConfig itself)."""
    if method not in RECIPES:
        raise ConfigError(f"no recipe for method {method!r}; expected one of {', '.join(RECIPES)}")
    cls, fields = RECIPES[method]
    if method == "gptq" and group_size is None:  # per channel: min/max (module docstring)
        fields = {**fields, "grid": "minmax"}
    return cls(w_bits=w_bits, group_size=group_size, symmetric=symmetric, **{**fields, **overrides})


def quantized_widths(model_or_config: Any) -> tuple[int, ...]:
    """The input widths of the linears quantization touches (sorted, distinct): from a model's first
    block, or from a config (hidden size: q/k/v, gate/up; heads × head dim: o; intermediate: down)."""
    if isinstance(model_or_config, nn.Module):
        from efficientml.llm.compress.mappings import BLOCK_LINEARS

        block = model_or_config.model.layers[0]
        return tuple(sorted({block.get_submodule(n).in_features for n in BLOCK_LINEARS}))
    c = model_or_config
    return tuple(sorted({c.hidden_size, c.num_attention_heads * c.dim_per_head, c.intermediate_size}))


def default_group_size(widths: tuple[int, ...] | list[int]) -> int | None:
    """The largest of :data:`GROUP_CANDIDATES` dividing every width; None when none does (then one
    scale per output channel, or a group size the caller chooses)."""
    return next((g for g in GROUP_CANDIDATES if all(w % g == 0 for w in widths)), None)


def describe(config: Config, calib: CalibConfig | None, method: str | None = None) -> str:
    """One line naming what runs: method, grid, every other field of the config, the calibration set."""
    d = {k: v for k, v in config.to_dict().items() if k != "__kind__"}
    text = method or type(config).kind
    if "w_bits" in d:
        text += f" W{d.pop('w_bits')} " + ("per-channel" if d["group_size"] is None else f"g{d['group_size']}")
        text += " symmetric" if d.pop("symmetric") else " asymmetric"
        d.pop("group_size")
    text += "".join(f", {k}={v}" for k, v in d.items())
    if calib is not None:
        text += f"; calibration {calib.n_samples} × {calib.seq_len} tokens of {calib.source} (seed {calib.seed})"
    return text
