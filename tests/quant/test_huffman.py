import numpy as np

from efficientml.quant.huffman import HuffmanTable, canonical_codes, code_lengths


def test_round_trip_exact_and_near_entropy():
    rng = np.random.default_rng(0)
    s = np.minimum(rng.geometric(0.3, size=50000) - 1, 255)
    t = HuffmanTable.fit(s, 256)
    data, nbits = t.encode(s)
    assert np.array_equal(t.decode(data, nbits, len(s)), s)
    p = np.bincount(s) / len(s)
    entropy = -(p[p > 0] * np.log2(p[p > 0])).sum()
    assert entropy <= nbits / len(s) < entropy + 1


def test_canonical_prefix_free_and_kraft():
    lengths = code_lengths(np.array([50, 20, 10, 10, 5, 3, 1, 1]))
    assert (2.0 ** -lengths.astype(float)).sum() <= 1.0
    codes = canonical_codes(lengths)
    words = [format(int(c), f"0{int(n)}b") for c, n in zip(codes, lengths)]
    assert not any(a != b and b.startswith(a) for a in words for b in words)


def test_length_limit_and_single_symbol():
    freqs = np.array([2 ** i for i in range(30)])          # would need 29-bit codes
    assert code_lengths(freqs, max_len=16).max() <= 16
    t = HuffmanTable.fit(np.zeros(10, dtype=np.int64), 4)
    data, nbits = t.encode(np.zeros(10, dtype=np.int64))
    assert nbits == 10 and np.array_equal(t.decode(data, nbits, 10), np.zeros(10))
