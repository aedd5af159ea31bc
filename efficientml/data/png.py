"""A small PNG reader (zlib + the five scanline filters), so reading sample images needs no imaging
library. It handles 8-bit, non-interlaced grayscale, gray+alpha, RGB and RGBA; anything else
(palette, 16-bit, Adam7) goes to Pillow when it is installed.
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np

from efficientml.core.errors import CheckpointError, UnsupportedError

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # color type → samples per pixel (8-bit only)


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Decode ``path`` to a uint8 array (H, W, C) with C in {1, 2, 3, 4}."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(_SIGNATURE):
        raise CheckpointError(f"{str(path)!r} is not a PNG file (bad signature)")
    header, idat = None, []
    pos = len(_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length  # length, type, body, crc
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None or not idat:
        raise CheckpointError(f"{str(path)!r} is a truncated PNG (no IHDR or IDAT chunk)")
    width, height, depth, color, _, _, interlace = header
    if depth != 8 or color not in _CHANNELS or interlace:
        return _read_with_pillow(path, depth, color, interlace)
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise CheckpointError(f"{str(path)!r} has corrupt image data ({e})") from None
    c = _CHANNELS[color]
    stride = width * c
    if len(raw) != height * (stride + 1):
        raise CheckpointError(
            f"{str(path)!r} has {len(raw)} bytes of pixels, expected {height * (stride + 1)}")
    rows = np.frombuffer(raw, np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), np.uint8)
    prev = np.zeros(stride, np.int32)
    for y in range(height):
        out[y] = prev = _unfilter(int(rows[y, 0]), rows[y, 1:].astype(np.int32), prev, c)
    return out.reshape(height, width, c)


def _unfilter(kind: int, line: np.ndarray, prev: np.ndarray, bpp: int) -> np.ndarray:
    """Undo one scanline filter; ``line``/``prev`` are int32 rows of bytes, bpp = bytes per pixel."""
    if kind == 0:  # None
        return line
    if kind == 2:  # Up
        return (line + prev) & 0xFF
    cur = line.tolist()
    up = prev.tolist()
    for i in range(len(cur)):  # Sub, Average and Paeth depend on the byte bpp to the left
        a = cur[i - bpp] if i >= bpp else 0
        if kind == 1:
            pred = a
        elif kind == 3:
            pred = (a + up[i]) >> 1
        elif kind == 4:
            b, cc = up[i], up[i - bpp] if i >= bpp else 0
            p = a + b - cc
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - cc)
            pred = a if pa <= pb and pa <= pc else (b if pb <= pc else cc)
        else:
            raise CheckpointError(f"PNG scanline filter type {kind} is invalid (expected 0–4)")
        cur[i] = (cur[i] + pred) & 0xFF
    return np.asarray(cur, np.int32)


def _read_with_pillow(path: str | os.PathLike, depth: int, color: int, interlace: int) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise UnsupportedError(
            f"{str(path)!r} is a PNG with bit depth {depth}, color type {color}, interlace {interlace}, "
            "which the built-in reader does not handle; install Pillow to read it") from None
    with Image.open(path) as im:
        if im.mode not in ("L", "LA", "RGB", "RGBA"):  # palette, 16-bit, …: widen to 8-bit RGB(A)
            im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
        arr = np.asarray(im)
    return arr if arr.ndim == 3 else arr[:, :, None]
