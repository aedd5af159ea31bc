"""Canonical Huffman coding of small-alphabet symbol streams (k-means indices, sparse-index gaps).

The code is canonical, so the table on disk is just one code length per symbol (a byte each).
Lengths are limited to ``max_len`` (default 16) by flattening the frequencies and rebuilding, which
keeps decoding a single lookup in a 2^max_len table per symbol.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from efficientml.core.errors import CheckpointError, ConfigError


def code_lengths(freqs: np.ndarray, max_len: int = 16) -> np.ndarray:
    """Huffman code length per symbol (0 for unused symbols), no longer than ``max_len``."""
    freqs = np.asarray(freqs, dtype=np.int64)
    used = np.flatnonzero(freqs)
    lengths = np.zeros(len(freqs), dtype=np.int64)
    if len(used) == 0:
        return lengths
    if len(used) == 1:
        lengths[used[0]] = 1
        return lengths
    if len(used) > 2 ** max_len:
        raise ConfigError(f"{len(used)} symbols cannot get codes of at most {max_len} bits")
    f = freqs.copy()
    while True:
        heap = [(int(f[s]), i, [int(s)]) for i, s in enumerate(used)]
        heapq.heapify(heap)
        depth = {int(s): 0 for s in used}
        tie = len(heap)
        while len(heap) > 1:
            fa, _, a = heapq.heappop(heap)
            fb, _, b = heapq.heappop(heap)
            for s in a + b:
                depth[s] += 1
            heapq.heappush(heap, (fa + fb, tie, a + b))
            tie += 1
        if max(depth.values()) <= max_len:
            for s, d in depth.items():
                lengths[s] = d
            return lengths
        f[used] = np.maximum(1, f[used] // 2)          # flatten the distribution and retry


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code per symbol: ordered by (length, symbol), each code = previous + 1, shifted."""
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, prev_len = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev_len
        codes[s] = code
        code += 1
        prev_len = int(lengths[s])
    return codes


@dataclass
class HuffmanTable:
    lengths: np.ndarray          # (alphabet,) uint8

    @classmethod
    def fit(cls, symbols: np.ndarray, alphabet: int, max_len: int = 16) -> "HuffmanTable":
        symbols = np.asarray(symbols, dtype=np.int64)
        if symbols.size and (symbols.min() < 0 or symbols.max() >= alphabet):
            raise ConfigError(f"Huffman symbols must lie in [0, {alphabet}), got [{symbols.min()}, {symbols.max()}]")
        freqs = np.bincount(symbols, minlength=alphabet)
        return cls(code_lengths(freqs, max_len).astype(np.uint8))

    @property
    def max_len(self) -> int:
        return int(self.lengths.max()) if self.lengths.size else 0

    def encode(self, symbols: np.ndarray) -> tuple[bytes, int]:
        """Pack the codes MSB-first; returns (bytes, number of bits)."""
        symbols = np.asarray(symbols, dtype=np.int64)
        if symbols.size == 0:
            return b"", 0
        lens = self.lengths.astype(np.int64)[symbols]
        if (lens == 0).any():
            raise ConfigError("a symbol to encode has no Huffman code (it was absent when the table was fit)")
        codes = canonical_codes(self.lengths.astype(np.int64))[symbols]
        L = int(lens.max())
        shifts = np.arange(L - 1, -1, -1)                            # bit j of a left-aligned code
        aligned = codes << (L - lens)
        bits = ((aligned[:, None] >> shifts[None, :]) & 1).astype(np.uint8)   # (n, L)
        keep = np.arange(L)[None, :] < lens[:, None]
        stream = bits[keep]                                          # row-major: symbol order
        return np.packbits(stream).tobytes(), int(stream.size)

    def decode(self, data: bytes, nbits: int, count: int) -> np.ndarray:
        """Decode ``count`` symbols from the first ``nbits`` bits of ``data``."""
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        L = self.max_len
        lengths = self.lengths.astype(np.int64)
        codes = canonical_codes(lengths)
        # lookup table over all L-bit windows: window → (symbol, length)
        sym_of = np.full(2 ** L, -1, dtype=np.int64)
        len_of = np.zeros(2 ** L, dtype=np.int64)
        for s in np.flatnonzero(lengths):
            lo = int(codes[s]) << (L - int(lengths[s]))
            hi = lo + (1 << (L - int(lengths[s])))
            sym_of[lo:hi], len_of[lo:hi] = s, lengths[s]
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:nbits].astype(np.int64)
        if bits.size < nbits:
            raise CheckpointError(f"Huffman stream is truncated: {bits.size} of {nbits} bits present")
        padded = np.concatenate([bits, np.zeros(L, dtype=np.int64)])
        windows = np.zeros(nbits, dtype=np.int64)
        for j in range(L):                                           # window at every bit position
            windows = (windows << 1) | padded[j:j + nbits]
        win, sym_l, len_l = windows.tolist(), sym_of.tolist(), len_of.tolist()
        out = [0] * count
        pos = 0
        for i in range(count):
            w = win[pos]
            out[i] = sym_l[w]
            pos += len_l[w]
            if pos > nbits or out[i] < 0:
                raise CheckpointError("Huffman stream is corrupt: it does not decode to the stored count")
        return np.asarray(out, dtype=np.int64)


def huffman_bits(symbols: np.ndarray, alphabet: int) -> int:
    """Encoded size in bits (without the table)."""
    t = HuffmanTable.fit(symbols, alphabet)
    return int((t.lengths.astype(np.int64)[np.asarray(symbols, dtype=np.int64)]).sum())
