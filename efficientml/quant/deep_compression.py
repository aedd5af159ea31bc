"""Deep Compression (Han et al. 2016): prune → k-means weight sharing → Huffman coding, written to a
real file that loads back to bit-identical weights.

File layout (``.emdc``)::

    b"EMDC" | u8 version | u32 header length | zlib(JSON header) | payload segments

Each k-means tensor stores: its fp32 codebook (32·2^N bits), the Huffman table of its indices (one
code-length byte per symbol), the Huffman-coded indices of the nonzero weights, the Huffman table of
the sparse-index gaps and the Huffman-coded gaps. A gap is the number of zeros before the next
nonzero; gaps ≥ 255 are written as a run of the escape symbol 255 (advance 255, no weight) followed
by the remainder. Every other tensor (BN, biases) is stored raw. :func:`size_breakdown` sums the
segments, so it equals the file size.

With ``float_dtype="float16"`` (format version 2) the codebooks and the raw float32 tensors are stored
as float16 and read back as float32. The save refuses values that float16 does not hold exactly, so
the round trip stays bit-identical: call :func:`round_to_float16` on the model first (it rounds every
float parameter and buffer, k-means centroids included, to the nearest float16) and measure the
model after that rounding. Version 1 files (all float32) still load.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from efficientml.core.config import Config, check_range
from efficientml.core.errors import CheckpointError, ConfigError
from efficientml.core.modules import named_layers
from efficientml.core.serialization import atomic_path
from efficientml.quant.huffman import HuffmanTable
from efficientml.quant.kmeans import Codebook

MAGIC, VERSION = b"EMDC", 2
READABLE_VERSIONS = (1, 2)
_FLOAT_DTYPES = ("float32", "float16")
ESCAPE = 255


# ------------------------------------------------------------------------------------------------
# Pruning (fine-grained magnitude, per layer) and the pipeline config
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeepCompressionConfig(Config):
    """``sparsity`` per layer name (fraction of zeros), or ``default_sparsity`` for the rest;
    ``conv_bits``/``linear_bits`` for the k-means codebooks."""

    kind = "deep_compression"
    default_sparsity: float = 0.8
    sparsity: dict = field(default_factory=dict)
    conv_bits: int = 4
    linear_bits: int = 4

    def validate(self) -> None:
        for s in [self.default_sparsity, *self.sparsity.values()]:
            check_range("sparsity", s, 0.0, 1.0, hi_open=True)
        for b in (self.conv_bits, self.linear_bits):
            if not isinstance(b, int) or not 1 <= b <= 8:
                raise ConfigError(f"k-means codebooks need 1 to 8 bits, got {b!r}")


def magnitude_prune(model: nn.Module, config: DeepCompressionConfig) -> dict[str, torch.Tensor]:
    """Zero the smallest-|w| fraction of each Conv2d/Linear weight (in place); returns the masks."""
    masks: dict[str, torch.Tensor] = {}
    layers = dict(named_layers(model, (nn.Conv2d, nn.Linear)))
    unknown = sorted(set(config.sparsity) - set(layers))
    if unknown:
        raise ConfigError(f"sparsity names layers the model does not have: {unknown}")
    for name, layer in layers.items():
        s = float(config.sparsity.get(name, config.default_sparsity))
        w = layer.weight.detach()
        k = int(round(s * w.numel()))
        if k == 0:
            mask = torch.ones_like(w, dtype=torch.bool)
        else:
            thr = w.abs().flatten().kthvalue(k).values
            mask = w.abs() > thr
        with torch.no_grad():
            layer.weight.mul_(mask)
        masks[name] = mask
    return masks


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Re-zero pruned weights (call after each optimizer step while fine-tuning)."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, m in masks.items():
            w = getattr(mods[name], "weight", None)
            if isinstance(w, torch.Tensor):
                w.mul_(m)


# ------------------------------------------------------------------------------------------------
# Sparse index gaps
# ------------------------------------------------------------------------------------------------
def encode_gaps(positions: np.ndarray) -> np.ndarray:
    """Flat nonzero positions → gap symbols (escape 255 = skip 255 without a weight)."""
    gaps = np.diff(np.concatenate([[-1], positions])) - 1
    out: list[int] = []
    for g in gaps.tolist():
        while g >= ESCAPE:
            out.append(ESCAPE)
            g -= ESCAPE
        out.append(g)
    return np.asarray(out, dtype=np.int64)


def decode_gaps(symbols: np.ndarray) -> np.ndarray:
    pos, out = -1, []
    for s in symbols.tolist():
        pos += s
        if s == ESCAPE:
            continue
        pos += 1
        out.append(pos)
    return np.asarray(out, dtype=np.int64)


# ------------------------------------------------------------------------------------------------
# File format
# ------------------------------------------------------------------------------------------------
@dataclass
class _Writer:
    chunks: list[bytes] = field(default_factory=list)
    offset: int = 0

    def put(self, b: bytes) -> dict[str, int]:
        self.chunks.append(b)
        seg = {"offset": self.offset, "nbytes": len(b)}
        self.offset += len(b)
        return seg


_DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16),
           "int64": (torch.int64, np.int64), "int32": (torch.int32, np.int32), "uint8": (torch.uint8, np.uint8),
           "bool": (torch.bool, np.bool_)}


def round_to_float16(model: nn.Module) -> nn.Module:
    """Round every float32 parameter and buffer (k-means centroids included) to the nearest float16
    value, in place, so that ``save_compressed(..., float_dtype="float16")`` round-trips exactly."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.dtype == torch.float32:
                h = t.half()
                if not torch.isfinite(h).all() and torch.isfinite(t).all():
                    raise ConfigError("a parameter or buffer exceeds float16's range (±65504); keep "
                                      "float_dtype='float32' for this model")
                t.copy_(h.float())
    return model


def _as_stored(key: str, t: torch.Tensor, float_dtype: str) -> tuple[torch.Tensor, str]:
    """The tensor as written (float32 → ``float_dtype``, checked to be exact) and its stored dtype name."""
    if t.dtype != torch.float32 or float_dtype == "float32":
        return t, str(t.dtype).replace("torch.", "")
    h = t.half()
    if not torch.equal(h.float(), t):
        raise ConfigError(f"{key!r} holds values float16 cannot store exactly; call round_to_float16(model) "
                          "before saving with float_dtype='float16'")
    return h, "float16"


def save_compressed(path: str | os.PathLike, state: dict[str, torch.Tensor],
                    codebooks: dict[str, Codebook], float_dtype: str = "float32") -> dict[str, int]:
    """Write ``state`` with each ``<layer>.weight`` of ``codebooks`` k-means + Huffman coded.

    The codebook must decode to exactly the state's weight (checked). ``float_dtype="float16"`` stores
    the codebooks and the float32 raw tensors as float16 (exact values only, see
    :func:`round_to_float16`); they load back as float32. Returns :func:`size_breakdown`."""
    if float_dtype not in _FLOAT_DTYPES:
        raise ConfigError(f"float_dtype must be one of {_FLOAT_DTYPES}, got {float_dtype!r}")
    w = _Writer()
    entries = []
    coded = {f"{n}.weight": cb for n, cb in codebooks.items()}
    missing = sorted(set(coded) - set(state))
    if missing:
        raise ConfigError(f"codebooks name weights the state dict does not have: {missing}")
    for key, t in state.items():
        t = t.detach().cpu()
        if key in coded:
            cb = coded[key]
            if not torch.equal(cb.decode().to(t.dtype), t):
                raise ConfigError(f"{key!r} is not exactly its codebook's weights; save after strip_kmeans "
                                  "of the fine-tuned k-means model")
            labels = cb.labels.reshape(-1).numpy()
            pos = np.flatnonzero(labels >= 0)
            idx = labels[pos]
            k = len(cb.centroids)
            idx_table = HuffmanTable.fit(idx, k)
            idx_bytes, idx_bits = idx_table.encode(idx)
            gsym = encode_gaps(pos)
            gap_table = HuffmanTable.fit(gsym, 256)
            gap_bytes, gap_bits = gap_table.encode(gsym)
            cents, cdt = _as_stored(f"{key} codebook", cb.centroids.detach().float(), float_dtype)
            entries.append({
                "name": key, "kind": "kmeans", "shape": list(t.shape), "bits": cb.bits, "nnz": int(len(pos)),
                "codebook_dtype": cdt, "codebook": w.put(cents.numpy().tobytes()),
                "idx_table": w.put(idx_table.lengths.tobytes()),
                "idx": {**w.put(idx_bytes), "bits": idx_bits},
                "gap_table": w.put(gap_table.lengths.tobytes()),
                "gaps": {**w.put(gap_bytes), "bits": gap_bits, "count": int(len(gsym))},
            })
        else:
            dt = str(t.dtype).replace("torch.", "")
            if dt not in _DTYPES:
                raise ConfigError(f"tensor {key!r} has dtype {dt}, which the compressed format does not store")
            stored, sdt = _as_stored(key, t, float_dtype)
            entries.append({"name": key, "kind": "raw", "dtype": dt, "stored_dtype": sdt, "shape": list(t.shape),
                            "data": w.put(stored.contiguous().numpy().tobytes())})
    header = zlib.compress(json.dumps({"tensors": entries}, separators=(",", ":")).encode(), 9)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<BI", VERSION, len(header)) + header)
            for c in w.chunks:
                f.write(c)
    return size_breakdown(path)


def _read(path: str | os.PathLike) -> tuple[list[dict[str, Any]], memoryview, int]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"compressed model file {str(p)!r} does not exist")
    raw = p.read_bytes()
    if raw[:4] != MAGIC:
        raise CheckpointError(f"{str(p)!r} is not an efficientml Deep Compression file (bad magic)")
    version, hlen = struct.unpack("<BI", raw[4:9])
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{str(p)!r} has format version {version}; this efficientml reads versions "
                              f"{list(READABLE_VERSIONS)}")
    try:
        header = json.loads(zlib.decompress(raw[9:9 + hlen]))
    except (zlib.error, ValueError) as e:
        raise CheckpointError(f"{str(p)!r} has a corrupt header ({e})") from e
    return header["tensors"], memoryview(raw)[9 + hlen:], 9 + hlen


def load_compressed(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.emdc`` file back into a state dict (k-means weights decoded to dense float32)."""
    entries, payload, _ = _read(path)

    def seg(s: dict[str, int]) -> bytes:
        if s["offset"] + s["nbytes"] > len(payload):
            raise CheckpointError(f"compressed file {str(path)!r} is truncated")
        return bytes(payload[s["offset"]:s["offset"] + s["nbytes"]])

    state: dict[str, torch.Tensor] = {}
    for e in entries:
        if e["kind"] == "raw":
            tdt, _ = _DTYPES[e["dtype"]]
            _, ndt = _DTYPES[e.get("stored_dtype", e["dtype"])]   # version 1: stored as its own dtype
            arr = np.frombuffer(seg(e["data"]), dtype=ndt).copy().reshape(e["shape"])
            state[e["name"]] = torch.from_numpy(arr).to(tdt)
            continue
        _, cdt = _DTYPES[e.get("codebook_dtype", "float32")]
        cents = torch.from_numpy(np.frombuffer(seg(e["codebook"]), dtype=cdt).copy()).float()
        idx_t = HuffmanTable(np.frombuffer(seg(e["idx_table"]), dtype=np.uint8).copy())
        gap_t = HuffmanTable(np.frombuffer(seg(e["gap_table"]), dtype=np.uint8).copy())
        idx = idx_t.decode(seg(e["idx"]), e["idx"]["bits"], e["nnz"])
        pos = decode_gaps(gap_t.decode(seg(e["gaps"]), e["gaps"]["bits"], e["gaps"]["count"]))
        numel = int(np.prod(e["shape"]))
        if len(pos) != e["nnz"] or (len(pos) and pos[-1] >= numel):
            raise CheckpointError(f"sparse index of {e['name']!r} in {str(path)!r} is corrupt")
        labels = np.full(numel, -1, dtype=np.int64)
        labels[pos] = idx
        cb = Codebook(cents, torch.from_numpy(labels).reshape(e["shape"]), e["bits"])
        state[e["name"]] = cb.decode()
    return state


def size_breakdown(path: str | os.PathLike) -> dict[str, int]:
    """Bytes on disk by category; ``total`` equals the file size."""
    entries, _, head = _read(path)
    out = {"header": head, "codebooks": 0, "index_huffman_tables": 0, "indices": 0,
           "gap_huffman_tables": 0, "sparse_gaps": 0, "raw_tensors": 0}
    for e in entries:
        if e["kind"] == "raw":
            out["raw_tensors"] += e["data"]["nbytes"]
        else:
            out["codebooks"] += e["codebook"]["nbytes"]
            out["index_huffman_tables"] += e["idx_table"]["nbytes"]
            out["indices"] += e["idx"]["nbytes"]
            out["gap_huffman_tables"] += e["gap_table"]["nbytes"]
            out["sparse_gaps"] += e["gaps"]["nbytes"]
    out["total"] = sum(out.values())
    out["file_size"] = Path(path).stat().st_size
    return out
