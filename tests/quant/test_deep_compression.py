import pytest
import torch
import torch.nn as nn

from efficientml.core.errors import CheckpointError, ConfigError
from efficientml.quant.deep_compression import (DeepCompressionConfig, decode_gaps, encode_gaps, load_compressed,
                                                magnitude_prune, round_to_float16, save_compressed, size_breakdown)
from efficientml.quant.kmeans import KMeansConfig, kmeans_codebooks, kmeans_quantize, strip_kmeans


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10))


def test_gap_escapes_round_trip():
    import numpy as np

    pos = np.array([0, 3, 300, 301, 1000, 5000])
    assert np.array_equal(decode_gaps(encode_gaps(pos)), pos)


def test_file_round_trip_identical_weights_and_outputs(tmp_path):
    m = _model().eval()
    masks = magnitude_prune(m, DeepCompressionConfig(default_sparsity=0.8, sparsity={"0": 0.5}))
    assert abs(masks["4"].float().mean().item() - 0.2) < 0.01
    books = kmeans_quantize(m, KMeansConfig(bits=4))
    strip_kmeans(m)
    x = torch.randn(4, 3, 8, 8)
    y = m(x)
    sizes = save_compressed(tmp_path / "m.emdc", m.state_dict(), books)
    state = load_compressed(tmp_path / "m.emdc")
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    m2 = _model().eval()
    m2.load_state_dict(state)
    assert torch.equal(m2(x), y)
    assert sizes["total"] == sizes["file_size"] == (tmp_path / "m.emdc").stat().st_size
    assert sizes["indices"] > 0 and sizes["sparse_gaps"] > 0 and sizes["codebooks"] == 2 * 16 * 4


def test_corrupt_files_are_clear_errors(tmp_path):
    p = tmp_path / "bad.emdc"
    p.write_bytes(b"NOPE")
    with pytest.raises(CheckpointError, match="not an efficientml Deep Compression file"):
        load_compressed(p)
    with pytest.raises(CheckpointError, match="does not exist"):
        size_breakdown(tmp_path / "missing.emdc")


def test_float16_storage_round_trips_exactly_and_is_smaller(tmp_path):
    m = _model().train()
    m(torch.randn(8, 3, 8, 8))                   # non-trivial BN running statistics
    m.eval()
    magnitude_prune(m, DeepCompressionConfig(default_sparsity=0.8))
    kmeans_quantize(m, KMeansConfig(bits=4))
    with pytest.raises(ConfigError, match="round_to_float16"):
        save_compressed(tmp_path / "x.emdc", strip_kmeans(_clone(m)).state_dict(), kmeans_codebooks(m),
                        float_dtype="float16")
    round_to_float16(m)                         # centroids too, so the stripped weights are float16 values
    books = kmeans_codebooks(m)
    strip_kmeans(m)
    x = torch.randn(4, 3, 8, 8)
    y = m(x)
    s32 = save_compressed(tmp_path / "m32.emdc", m.state_dict(), books)
    s16 = save_compressed(tmp_path / "m16.emdc", m.state_dict(), books, float_dtype="float16")
    state = load_compressed(tmp_path / "m16.emdc")
    assert all(v.dtype == state[k].dtype and torch.equal(v, state[k]) for k, v in m.state_dict().items())
    m2 = _model().eval()
    m2.load_state_dict(state)
    assert torch.equal(m2(x), y)
    assert s16["codebooks"] == 2 * 16 * 2 and s32["codebooks"] == 2 * 16 * 4
    n_float = sum(v.numel() for k, v in m.state_dict().items() if v.dtype == torch.float32 and not k.endswith(
        ("0.weight", "4.weight")))
    assert s32["raw_tensors"] - s16["raw_tensors"] == 2 * n_float
    assert s16["file_size"] == (tmp_path / "m16.emdc").stat().st_size
    with pytest.raises(ConfigError, match="float_dtype"):
        save_compressed(tmp_path / "b.emdc", m.state_dict(), books, float_dtype="bfloat16")


def _clone(m):
    import copy

    return copy.deepcopy(m)
