import struct
import zlib

import numpy as np
import pytest

from efficientml.core.errors import CheckpointError
from efficientml.data.cifar_samples import sample_files
from efficientml.data.png import read_png


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def encode_png(img: np.ndarray, filters: list[int]) -> bytes:
    """A reference encoder: row y uses filter filters[y % len(filters)]."""
    h, w, c = img.shape
    color = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = img.reshape(h, w * c).astype(int)
    raw = bytearray()
    prev = [0] * (w * c)
    for y in range(h):
        kind = filters[y % len(filters)]
        cur = rows[y].tolist()
        raw.append(kind)
        for i, v in enumerate(cur):
            a = cur[i - c] if i >= c else 0
            b = prev[i]
            cc = prev[i - c] if i >= c else 0
            pred = [0, a, b, (a + b) >> 1, _paeth(a, b, cc)][kind]
            raw.append((v - pred) & 0xFF)
        prev = cur

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b"")


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_all_filters_round_trip(tmp_path, channels):
    img = np.random.default_rng(channels).integers(0, 256, size=(10, 7, channels), dtype=np.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(encode_png(img, [0, 1, 2, 3, 4]))
    np.testing.assert_array_equal(read_png(path), img)


def test_matches_pillow_on_cifar_samples():
    Image = pytest.importorskip("PIL.Image")
    for p in sample_files():
        np.testing.assert_array_equal(read_png(p), np.asarray(Image.open(p)))


def test_not_a_png(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"GIF89a....")
    with pytest.raises(CheckpointError, match="not a PNG"):
        read_png(tmp_path / "bad.png")
