"""Calibration statistics of a block: what AWQ and GPTQ read from its inputs.

Per set of linears sharing one input (q/k/v, o, gate/up, down; keyed by the set's first linear): the
mean |x| per input channel (AWQ's activation scale), the Hessian 2/N·XᵀX (GPTQ), and the inputs of the
first few calibration sequences (AWQ's α and clip searches). One pass of the block collects them all.

GPTQ's Hessians can weight the first position of every calibration sequence more (``sink_share``: the
share of each sequence's weight that its first token carries, so w = share·(T − 1)/(1 − share) for
sequences of T tokens, at least 1). That token becomes the attention sink (every later query attends
to it), so an error in its q/k/v
outputs reaches every position; an unweighted Hessian counts it as one token in 512 and GPTQ, which
moves error into directions that ordinary tokens rarely use, leaves it up to 10× the RTN error there
(SmolLM2-135M, T = 512: plain GPTQ ends above RTN's perplexity at W4 and W3; in a sweep on 10 test
windows, shares of 1–20 % all fixed it; the default 5 % is w ≈ 27. benchmarks/results/
llm_compression.json has the table with it, plain GPTQ, and act-order without it).

``sink_rule="trace"`` sets w per Hessian from the data instead: the first positions then carry exactly
``sink_share`` of the Hessian's trace (w = share·tr(H_rest) / ((1 − share)·tr(H_first)), up or down;
share 0 drops them). Where the block input is normalized (q/k/v, gate/up) the first token is an ordinary
token in size and w is about the "tokens" rule's; but the sink carries massive activations into some
down_proj inputs (SmolLM2-135M block 28: its per-token RTN output error is 730× the others'), where it
already dominates the unweighted Hessian and GPTQ, weighting it 27× more, buys its accuracy with the
other tokens' (layer-local probe, W4 g64, down_proj of all 30 blocks: the other tokens' output error
0.74 of RTN's with the "tokens" rule vs 0.44 unweighted on WikiText-2, 1.31 vs 0.79 on TinyShakespeare).

When every block's inputs are the fp model's activations (AWQ always; GPTQ with ``propagate="fp"``),
the statistics do not depend on the quantization setting: ``quantize(..., keep_stats=True)`` returns
them, and ``quantize(model, config, stats=stats)`` applies another setting (bits, group size, AWQ,
GPTQ or both) to a fresh copy of the model without running it over the calibration set again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from efficientml.core.config import check_choice, check_range
from efficientml.core.errors import ConfigError
from efficientml.core.memory import release_memory
from efficientml.llm.compress.calib import BlockContext, BlockData, cast_block


@dataclass
class BlockStats:
    x_mean: dict[str, torch.Tensor] = field(default_factory=dict)   # (in,) mean |x| over all tokens
    hessian: dict[str, torch.Tensor] = field(default_factory=dict)  # (in, in) 2/N·XᵀX, fp32
    samples: dict[str, torch.Tensor] = field(default_factory=dict)  # (n_s, T, in) first sequences' inputs

    def to(self, device: torch.device | str) -> "BlockStats":
        mv = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return BlockStats(mv(self.x_mean), mv(self.hessian), mv(self.samples))


@dataclass
class CalibStats:
    """Every block's statistics from one calibration run (fp propagation) and the blocks' rope/mask."""

    blocks: list[BlockStats]
    ctx: BlockContext
    tokens: int                    # calibration tokens the statistics cover
    sink_share: float = 0.0        # share of each sequence's Hessian weight on its first position
    sink_rule: str = "tokens"      # how that share is read: of the tokens, or of the Hessian's trace

    def merge(self, other: "CalibStats") -> "CalibStats":
        """Statistics of two runs over the same calibration tokens (e.g. AWQ's and GPTQ's), combined."""
        if other.tokens != self.tokens or len(other.blocks) != len(self.blocks):
            raise ConfigError("calibration statistics to merge must come from the same tokens and model")
        has_h = [s for s in (self, other) if s.blocks and s.blocks[0].hessian]
        if len({(s.sink_share, s.sink_rule) for s in has_h}) > 1:
            raise ConfigError(f"calibration statistics to merge hold Hessians with different sink weights "
                              f"(share {has_h[0].sink_share} by {has_h[0].sink_rule!r} and {has_h[1].sink_share} by "
                              f"{has_h[1].sink_rule!r})")
        blocks = [BlockStats({**a.x_mean, **b.x_mean}, {**a.hessian, **b.hessian}, {**a.samples, **b.samples})
                  for a, b in zip(self.blocks, other.blocks)]
        src = has_h[-1] if has_h else CalibStats([], self.ctx, 0)
        return CalibStats(blocks, self.ctx, self.tokens, src.sink_share, src.sink_rule)


class HessianAccumulator:
    """Running H = 2/N · Σ x xᵀ over batches of inputs (tokens, features).

    H is symmetric, so only its block upper triangle is accumulated (feature blocks of ~``block``
    columns: 10 of 16 block products for 4 blocks; inputs ≥ 1024 wide) and mirrored once when read —
    on a CPU the Hessians otherwise cost as much as the block's forward pass."""

    def __init__(self, n: int, device: torch.device | str = "cpu", block: int = 384) -> None:
        self.H = torch.zeros(n, n, dtype=torch.float32, device=device)
        self.count = 0
        k = max(1, round(n / block)) if n >= 1024 else 1  # narrow: one GEMM is faster than its blocks
        self.cuts = [n * i // k for i in range(k + 1)]

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (tokens, features); N grows by their number."""
        self._accumulate(x.float())
        self.count += x.shape[0]

    def add_extra(self, x: torch.Tensor, weight: float) -> None:
        """Add ``weight``·x xᵀ for rows already added, without growing N: those rows then count
        1 + ``weight`` times (``weight`` ≥ −1: −1 removes them) and the others' weight is not diluted."""
        self._accumulate(x.float(), weight)

    def trace(self) -> float:
        """tr(Σ x xᵀ) so far (unscaled)."""
        return float(self.H.diagonal().sum())

    def _accumulate(self, x: torch.Tensor, alpha: float = 1.0) -> None:
        c = self.cuts
        for i in range(len(c) - 1):
            xi = x[:, c[i]:c[i + 1]]
            self.H[c[i]:c[i + 1], c[i]:].addmm_(xi.t(), x[:, c[i]:], alpha=alpha)  # row block i, upper part

    def value(self, inplace: bool = False) -> torch.Tensor:
        """H; ``inplace`` scales the accumulator itself (no second (n, n) buffer; it is then spent)."""
        c = self.cuts
        H = self.H if inplace else self.H.clone()
        for i in range(1, len(c) - 1):  # mirror the strict upper block triangle into the lower one
            H[c[i]:, c[i - 1]:c[i]] = H[c[i - 1]:c[i], c[i]:].t()
        return H.mul_(2.0 / max(self.count, 1))


def sink_weight(share: float, seq_len: int) -> float:
    """How many times the first of ``seq_len`` tokens counts so that it carries ``share`` of the
    sequence's weight (the others count once); never below 1."""
    return max(1.0, share * (seq_len - 1) / (1.0 - share))


def trace_sink_weight(share: float, trace_all: float, trace_first: float) -> float:
    """How many times the first positions count so that they carry ``share`` of the Hessian's trace,
    given the unweighted traces of all positions and of the first ones (1 when the first are all zero)."""
    if trace_first <= 0.0:
        return 1.0
    return share * max(trace_all - trace_first, 0.0) / ((1.0 - share) * trace_first)


SINK_RULES = ("tokens", "trace")


@torch.no_grad()
def collect_block(data: BlockData, sets: list[tuple[str, ...]], x_mean: bool = True, hessian: bool = False,
                  n_samples: int = 0, keep_outputs: bool = True, sink_share: float = 0.0,
                  sink_rule: str = "tokens") -> tuple[BlockStats, torch.Tensor | None]:
    """One pass over all calibration inputs (mean |x| and/or Hessians, and the block's fp outputs if
    ``keep_outputs``), then one over the first ``n_samples`` sequences to keep their inputs.
    ``sink_share``: the share of the Hessians' weight on each sequence's first position, of its tokens
    (``sink_rule="tokens"``) or of each Hessian's trace (``"trace"``, see the module docstring)."""
    check_range("sink_share", sink_share, 0.0, 1.0, hi_open=True)
    check_choice("sink_rule", sink_rule, SINK_RULES)
    block = data.block
    T = data.inputs.shape[1]
    sink_w = sink_weight(sink_share, T)
    d_in = {s[0]: block.get_submodule(s[0]).in_features for s in sets}
    absum = {k: torch.zeros(n, device=data.device) for k, n in d_in.items()} if x_mean else {}
    count = dict.fromkeys(d_in, 0)
    hess = {k: HessianAccumulator(n, data.device) for k, n in d_in.items()} if hessian else {}
    firsts: dict[str, list[torch.Tensor]] = {k: [] for k in d_in}  # "trace": the first positions' inputs

    def stat(k: str) -> Callable[[torch.Tensor], None]:
        def fn(x: torch.Tensor) -> None:  # x: (tokens, in)
            if x_mean:
                absum[k] += x.abs().sum(0)
            count[k] += x.shape[0]
            if hessian:
                hess[k].add(x)
                x0 = x.view(-1, T, x.shape[-1])[:, 0]  # (B·T, in) → the B first positions
                if sink_rule == "trace":
                    firsts[k].append(x0.float().clone())
                elif sink_w > 1.0:  # counted sink_w − 1 more times
                    hess[k].add_extra(x0, sink_w - 1.0)
        return fn

    out = data.run({k: stat(k) for k in d_in}, keep_outputs=keep_outputs)
    if hessian and sink_rule == "trace":
        for k, h in hess.items():  # weight w: the first positions carry sink_share of tr(H)
            x0 = torch.cat(firsts.pop(k))
            h.add_extra(x0, trace_sink_weight(sink_share, h.trace(), float(x0.pow(2).sum())) - 1.0)
    # value(inplace=True) hands over each accumulator's own buffer: no second (n, n) copy
    st = BlockStats({k: absum[k] / count[k] for k in absum}, {k: h.value(inplace=True) for k, h in hess.items()})
    if n_samples:
        feats: dict[str, list[torch.Tensor]] = {k: [] for k in d_in}
        n_s = min(n_samples, data.inputs.shape[0])
        data.run({k: feats[k].append for k in d_in}, samples=slice(0, n_s), keep_outputs=False)
        st.samples = {k: torch.cat(v).reshape(n_s, T, -1) for k, v in feats.items()}
    return st, out


def apply_with_stats(model: nn.Module, stats: CalibStats, transform: Callable[[BlockData, BlockStats], None],
                     batch_size: int = 8, device: torch.device | str | None = None) -> None:
    """``transform(data, block_stats)`` for every block from stored statistics: no calibration pass.
    Each block is moved to ``device`` in fp32 for its transform and back afterwards."""
    if len(stats.blocks) != len(model.model.layers):
        raise ConfigError(f"calibration statistics cover {len(stats.blocks)} blocks; the model has "
                          f"{len(model.model.layers)}")
    home = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    device = torch.device(device) if device is not None else home
    ctx = stats.ctx.to(device)
    for i, block in enumerate(model.model.layers):
        cast_block(block, torch.float32, device)
        transform(BlockData(i, block, None, ctx, batch_size, device), stats.blocks[i].to(device))  # type: ignore[arg-type]
        cast_block(block, dtype, home)
        release_memory()
