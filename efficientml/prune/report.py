"""Before/after reports: parameters, size, MACs, measured CPU latency (batch 1 and 64), accuracy.

Every speedup carries its kind: ``measured`` (wall-clock, analysis' timer: warm-up, median) or
``theoretical`` (a ratio of MACs or nonzero weights). The two are never mixed in one number.
Latencies of the two models are measured in alternating rounds so that load from other processes
hits both alike; the reported value is the median over rounds of each round's median.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

import torch
import torch.nn as nn


def measure_pair(a: nn.Module, b: nn.Module, x: torch.Tensor, threads: int = 2, rounds: int = 5,
                 runs: int = 10, warmup: int = 3) -> tuple[float, float]:
    """Median latency (ms) of ``a(x)`` and ``b(x)``, interleaved over ``rounds``."""
    from efficientml.analysis import measure_latency

    ta, tb = [], []
    for _ in range(rounds):
        ta.append(measure_latency(a, x, warmup=warmup, runs=runs, threads=threads).median_ms)
        tb.append(measure_latency(b, x, warmup=warmup, runs=runs, threads=threads).median_ms)
    return statistics.median(ta), statistics.median(tb)


def model_stats(model: nn.Module, sample_shape: tuple[int, ...]) -> dict[str, Any]:
    """Parameters (all and nonzero), fp32 size (dense and of nonzero weights) and MACs for one input."""
    from efficientml.analysis import count_macs, count_parameters

    params = count_parameters(model)
    nonzero = count_parameters(model, nonzero_only=True)
    return {"params": params, "nonzero_params": nonzero, "size_bytes_fp32": 4 * params,
            "nonzero_bytes_fp32": 4 * nonzero,
            "macs": count_macs(model, (1, *sample_shape)).macs}


def compare(before: nn.Module, after: nn.Module, sample_shape: tuple[int, ...],
            accuracy: Callable[[nn.Module], float] | None = None, threads: int = 2,
            batch_sizes: tuple[int, ...] = (1, 64), rounds: int = 5, runs: int = 10) -> dict[str, Any]:
    """The before/after table as a dict: ``{"before": {...}, "after": {...}, "ratios": {...}}``."""
    rows = {"before": model_stats(before, sample_shape), "after": model_stats(after, sample_shape)}
    ratios: dict[str, Any] = {
        "param_reduction": {"value": rows["before"]["params"] / rows["after"]["params"], "kind": "theoretical"},
        "nonzero_size_ratio": {"value": rows["after"]["nonzero_params"] / rows["before"]["params"],
                               "kind": "theoretical"},
        "mac_reduction": {"value": rows["before"]["macs"] / max(1, rows["after"]["macs"]), "kind": "theoretical"},
    }
    for bs in batch_sizes:
        x = torch.randn(bs, *sample_shape)
        tb, ta = measure_pair(before, after, x, threads, rounds, runs)
        rows["before"][f"latency_ms_bs{bs}"], rows["after"][f"latency_ms_bs{bs}"] = tb, ta
        ratios[f"speedup_bs{bs}"] = {"value": tb / ta, "kind": "measured", "threads": threads}
    if accuracy is not None:
        rows["before"]["accuracy"], rows["after"]["accuracy"] = accuracy(before), accuracy(after)
        ratios["accuracy_drop_points"] = rows["before"]["accuracy"] - rows["after"]["accuracy"]
    return {**rows, "ratios": ratios}


def format_table(report: dict[str, Any]) -> str:
    """A Markdown table of a :func:`compare` report."""
    keys = [k for k in report["before"] if k in report["after"]]
    lines = ["| metric | before | after |", "| --- | ---: | ---: |"]
    for k in keys:
        b, a = report["before"][k], report["after"][k]
        fmt = (lambda v: f"{v:,.3f}") if isinstance(b, float) else (lambda v: f"{v:,}")
        lines.append(f"| {k} | {fmt(b)} | {fmt(a)} |")
    for k, v in report["ratios"].items():
        if isinstance(v, dict):
            lines.append(f"| {k} ({v['kind']}) | | {v['value']:.3f}× |")
        else:
            lines.append(f"| {k} | | {v:.3f} |")
    return "\n".join(lines)
