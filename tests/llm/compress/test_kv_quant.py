import pytest
import torch

from efficientml.core.errors import ConfigError
from efficientml.llm.compress import QuantizedKVCache
from efficientml.llm.generate import SamplingConfig, generate

from ..conftest import tiny_model


def _sqnr(ref, out):
    return 10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()).item()


@pytest.mark.parametrize("bits,floor", [(8, 38.0), (4, 14.0)])
def test_kv_quantization_sqnr(bits, floor):
    c = QuantizedKVCache(1, 2, 3, 16, 32, bits=bits)
    k, v = torch.randn(2, 3, 10, 16), torch.randn(2, 3, 10, 16)
    k2, v2 = c.update(0, k, v, torch.arange(10))
    assert k2.shape == k.shape
    assert _sqnr(k, k2) > floor and _sqnr(v, v2) > floor
    c.advance(10)
    k3, _ = c.update(0, k[:, :, :1], v[:, :, :1], torch.arange(10, 11))  # decode step appends
    assert k3.shape[2] == 11 and torch.equal(k3[:, :, :10], k2)


def test_kv_cache_in_model_and_generate(ids):
    m = tiny_model()
    with torch.no_grad():
        ref = m(ids)
        out8 = m(ids, cache=QuantizedKVCache.for_model(m, 2, 32, bits=8))
        out4 = m(ids, cache=QuantizedKVCache.for_model(m, 2, 32, bits=4))
    assert (out8 - ref).abs().max() < (out4 - ref).abs().max() < 0.5
    assert (out8 - ref).abs().max() < 0.05
    c = QuantizedKVCache.for_model(m, 1, 40, bits=8)
    fp = m.new_cache(1, 40)
    assert c.nbytes() < fp.nbytes() / 3
    r = generate(m, ids[0].tolist()[:8], SamplingConfig(max_new_tokens=5), cache=c)
    r_fp = generate(m, ids[0].tolist()[:8], SamplingConfig(max_new_tokens=5))
    assert r.tokens[0] == r_fp.tokens[0]  # greedy decoding unchanged by an int8 cache here


def test_kv_bad_bits():
    with pytest.raises(ConfigError, match="8 or 4"):
        QuantizedKVCache(1, 1, 1, 16, 8, bits=3)


@pytest.mark.parametrize("group", [None, 16])
def test_int8_kv_codes_are_the_shared_grid(group):
    """int8 KV codes come from quant.grid: equal to the closed form round(x / s), s = fp16(absmax / 127)."""
    torch.manual_seed(0)
    c = QuantizedKVCache(1, 2, 3, 64, 8, bits=8, group_size=group)
    x = torch.randn(2, 3, 5, 64) * 3
    q, s, _ = c._quantize(x)
    xg = x.reshape(2, 3, 5, 64 // c.g, c.g)
    s_ref = (xg.abs().amax(-1) / 127.0).half()
    q_ref = torch.round(xg / s_ref.float()[..., None]).clamp(-127, 127).to(torch.int8).reshape(2, 3, 5, 64)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
