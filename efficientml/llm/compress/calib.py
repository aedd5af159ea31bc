"""Calibration data and block-by-block capture.

The model never runs end to end during calibration. A stand-in replaces the block list for one pass of
the trunk: it records the first block's input (and the rotary tables and mask the blocks receive) and
returns at once — a clean early return, no exception as control flow. Then each block runs alone on
the stored inputs; its outputs become the next block's inputs. Peak memory is one block in fp32, the
activations of one batch, and the stored hidden states (N·T·d fp32 on the CPU) — not the model's
activations.

    tokens = calibration_tokens(tok, CalibConfig(source="wikitext2-valid", n_samples=128, seq_len=512))
    run_blockwise(model, tokens, process, batch_size=8)   # process(data: BlockData) per block

A calibration set may mix corpora: ``source="wikitext2-valid,tinyshakespeare-train"`` takes sample i
from source i mod k (k sources), so every source gets n_samples // k windows (the first n_samples mod k
sources one more) and any prefix of the set — AWQ searches on its first sequences — is mixed too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from efficientml.core.config import Config
from efficientml.core.errors import ConfigError, ShapeError
from efficientml.core.memory import release_memory
from efficientml.core.progress import track

MIN_CALIB_TOKENS = 128


@dataclass(frozen=True)
class CalibConfig(Config):
    """Deterministic calibration windows: ``n_samples`` windows of ``seq_len`` tokens drawn from
    ``source`` (a corpus name from efficientml.data.text — wikitext2-valid, wikitext2-raw-test,
    tinyshakespeare, tinyshakespeare-train — a UTF-8 text file, or several of these joined by commas:
    a mixed set, see the module docstring) at positions chosen by ``seed``."""

    kind = "calib"
    source: str = "wikitext2-valid"
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def validate(self) -> None:
        if self.n_samples <= 0 or self.seq_len <= 0:
            raise ConfigError(f"calibration needs positive n_samples and seq_len, got {self.n_samples}, {self.seq_len}")
        if self.n_samples * self.seq_len < MIN_CALIB_TOKENS:
            raise ConfigError(f"calibration of {self.n_samples}×{self.seq_len} tokens is too small; "
                              f"use at least {MIN_CALIB_TOKENS} tokens")
        if self.n_samples < len(self.sources):
            raise ConfigError(f"a calibration mix of {len(self.sources)} sources needs at least that many samples, "
                              f"got {self.n_samples}")

    @property
    def sources(self) -> tuple[str, ...]:
        """The corpora (or files) of the set, in the order samples cycle through them."""
        return calibration_sources(self.source)

    def counts(self) -> tuple[int, ...]:
        """Windows taken from each source: n_samples // k, the first n_samples mod k one more."""
        n, k = self.n_samples, len(self.sources)
        return tuple(n // k + (j < n % k) for j in range(k))


def calibration_sources(source: str) -> tuple[str, ...]:
    """``source`` split at commas, unless it is one existing file whose name holds a comma."""
    if "," not in source or Path(source).is_file():
        return (source,)
    parts = tuple(p.strip() for p in source.split(","))
    if not all(parts):
        raise ConfigError(f"calibration source {source!r} has an empty name between commas")
    return parts


def _windows(tokenizer, source: str, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """(n, seq_len) windows at seeded random offsets of one tokenized corpus."""
    from efficientml.data.text import load_text

    ids = torch.tensor(tokenizer.encode(load_text(source), add_bos=False), dtype=torch.long)
    if ids.numel() < seq_len + 1:
        raise ConfigError(f"calibration text {source!r} has {ids.numel()} tokens, fewer than one "
                          f"window of seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def calibration_tokens(tokenizer, cfg: CalibConfig = CalibConfig()) -> torch.Tensor:
    """(n_samples, seq_len) token ids. One source: windows at seeded random offsets of the tokenized
    corpus; a mix: source j's windows (seed + j) fill rows j, j + k, j + 2k, …"""
    srcs = cfg.sources
    if len(srcs) == 1:
        return _windows(tokenizer, srcs[0], cfg.n_samples, cfg.seq_len, cfg.seed)
    out = torch.empty(cfg.n_samples, cfg.seq_len, dtype=torch.long)
    for j, (src, n) in enumerate(zip(srcs, cfg.counts())):
        out[j::len(srcs)] = _windows(tokenizer, src, n, cfg.seq_len, cfg.seed + j)
    return out


def check_calib(tokens: torch.Tensor | None, method: str) -> torch.Tensor:
    if tokens is None:
        raise ConfigError(f"{method} needs calibration tokens; pass calib=calibration_tokens(tokenizer, CalibConfig())")
    if tokens.dim() != 2:
        raise ShapeError(f"calibration tokens must be (n_samples, seq_len), got shape {tuple(tokens.shape)}")
    if tokens.numel() < MIN_CALIB_TOKENS:
        raise ConfigError(f"{method} got {tokens.numel()} calibration tokens; it needs at least {MIN_CALIB_TOKENS}")
    return tokens


class _FirstBlockRecorder(nn.Module):
    """Stands in for the whole block list during one trunk pass: records the first block's inputs and
    returns them unchanged, so no block runs."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: list[torch.Tensor] = []
        self.rope = None
        self.mask = None

    def forward(self, x, rope, attn_mask=None, cache=None, input_pos=None):  # DecoderLayer's signature
        self.hidden.append(x.detach().float().cpu())
        self.rope, self.mask = rope, attn_mask
        return x


@dataclass
class BlockContext:
    rope: tuple[torch.Tensor, torch.Tensor] | None
    mask: torch.Tensor | None

    def to(self, device: torch.device) -> "BlockContext":
        rope = None if self.rope is None else tuple(t.to(device=device, dtype=torch.float32) for t in self.rope)
        return BlockContext(rope, None if self.mask is None else self.mask.to(device))  # type: ignore[arg-type]


@torch.no_grad()
def capture_first_block_inputs(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8
                               ) -> tuple[torch.Tensor, BlockContext]:
    """Hidden states entering block 0, (N, T, d) fp32 on the CPU, and the blocks' rope/mask."""
    trunk = model.model
    layers = trunk.layers
    rec = _FirstBlockRecorder()
    trunk.layers = nn.ModuleList([rec])
    try:
        dev = trunk.embed_tokens.weight.device
        for batch in tokens.split(batch_size):
            trunk(batch.to(dev))
    finally:
        trunk.layers = layers
    return torch.cat(rec.hidden), BlockContext(rec.rope, rec.mask)


_QUANT_MODULES: tuple[type, ...] = ()


def _is_packed(m: nn.Module) -> bool:
    global _QUANT_MODULES
    if not _QUANT_MODULES:
        from efficientml.llm.kernels.qlinear import QuantLinear, W8A8Linear

        _QUANT_MODULES = (QuantLinear, W8A8Linear)
    return isinstance(m, _QUANT_MODULES)


def cast_block(block: nn.Module, dtype: torch.dtype, device: torch.device | str) -> None:
    """Move a block, casting float weights of ordinary modules to ``dtype``; packed modules keep
    their storage dtypes (fp16 scales must not be re-rounded)."""
    for m in block.modules():
        if _is_packed(m):
            m.to(device)
            continue
        for name, p in list(m.named_parameters(recurse=False)):
            if p.is_floating_point() and (p.dtype != dtype or p.device != torch.device(device)):
                setattr(m, name, nn.Parameter(p.detach().to(device=device, dtype=dtype), requires_grad=False))


@dataclass
class BlockData:
    """One block and the hidden states entering it; helpers run it batch by batch."""

    index: int
    block: nn.Module
    inputs: torch.Tensor           # (N, T, d) fp32, CPU
    ctx: BlockContext
    batch_size: int
    device: torch.device
    extra: dict = field(default_factory=dict)

    def batches(self, samples: slice | None = None) -> Iterator[torch.Tensor]:
        x = self.inputs if samples is None else self.inputs[samples]
        for b in x.split(self.batch_size):
            yield b.to(self.device)

    def call(self, module: nn.Module, x: torch.Tensor, attention: bool = False) -> torch.Tensor:
        """Run a submodule of the block: attention modules also get the rotary tables and mask."""
        if attention:
            return module(x, self.ctx.rope, self.ctx.mask)
        return module(x)

    @torch.no_grad()
    def run(self, hooks: dict[str, Callable[[torch.Tensor], None]] | None = None,
            samples: slice | None = None, keep_outputs: bool = True) -> torch.Tensor | None:
        """Run the block over the stored inputs; ``hooks[name](x)`` sees each batch's input to the
        named submodule (flattened to (tokens, features)). Returns the outputs (CPU, fp32)."""
        handles = []
        for name, fn in (hooks or {}).items():
            mod = self.block.get_submodule(name)
            handles.append(mod.register_forward_hook(
                lambda m, inp, out, fn=fn: fn(inp[0].detach().reshape(-1, inp[0].shape[-1]).float())))
        outs = []
        try:
            for x in self.batches(samples):
                y = self.block(x, self.ctx.rope, self.ctx.mask)
                if keep_outputs:
                    outs.append(y.float().cpu())
        finally:
            for h in handles:
                h.remove()
        return torch.cat(outs) if keep_outputs else None


def run_blockwise(model: nn.Module, tokens: torch.Tensor, process: Callable[[BlockData], torch.Tensor | None],
                  batch_size: int = 8, device: torch.device | str | None = None, desc: str = "calibrating",
                  progress: bool | None = None) -> BlockContext:
    """Capture block 0's inputs, then for each block: move it to ``device`` in fp32, call
    ``process(data)``, and propagate. ``process`` may return the next block's inputs (e.g. the fp
    outputs it computed anyway); if it returns None, the transformed block is run again to get them.
    The block goes back to its original device and dtype afterwards. Returns the blocks' rope/mask."""
    home = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    device = torch.device(device) if device is not None else home
    inputs, ctx = capture_first_block_inputs(model, tokens, batch_size)
    ctx = ctx.to(device)
    layers = model.model.layers
    for i in track(range(len(layers)), desc, total=len(layers), enabled=progress):
        block = layers[i]
        cast_block(block, torch.float32, device)
        data = BlockData(i, block, inputs, ctx, batch_size, device)
        nxt = process(data)
        if nxt is None:
            nxt = data.run()
        cast_block(block, dtype, home)
        inputs = nxt
        del data, nxt
        release_memory()  # this block's freed scratch must not stay resident into the next block's peak
    return ctx
