"""The native (C) decode step on an int8 / int4 quantized KV cache: the C quantizer gives exactly the
codes, scales and zeros of ``QuantizedKVCache._quantize``; over a dozen steps the cache it writes is the
eager one's, its logits agree to float rounding, and ``generate`` takes it on a kv-quantized model."""

import copy

import pytest
import torch

from efficientml.core.transform import apply
from efficientml.llm.compress import RTNConfig
from efficientml.llm.compress.kv_quant import KVCacheQuantConfig, QuantizedKVCache
from efficientml.llm.generate import SamplingConfig, generate
from efficientml.llm.kernels import native_step
from efficientml.llm.kernels.decode import prepare_cpu_decode
from tests.llm.conftest import tiny_model

pytestmark = pytest.mark.skipif(native_step.status().startswith("off"), reason=native_step.status())

HD = 64


def _adversarial(n: int = 2048) -> torch.Tensor:
    """Rows (n, HD) over 14 decades (fp16 subnormal and overflowing scales) with fp16 rounding midpoints,
    constant and all-zero rows and exact .5 ties of x / scale."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, HD, generator=g) * torch.logspace(-9, 5, n)[:, None]
    h = torch.randn(n // 4, generator=g).half()
    x[: n // 4, 0] = (h.float() + torch.nextafter(h, torch.full_like(h, float("inf"))).float()) / 2
    x[n // 4: n // 2] = x[n // 4: n // 2, :1]
    x[n // 2: n // 2 + 8] = 0
    # exact ties: every 8 columns one anchor makes the group's scale 2^-7 (int8: absmax 127·2^-7; int4:
    # min 0, max 15·2^-7) and the other values are (k + 1/2)·2^-7
    i8, i4 = x[-n // 4: -n // 8], x[-n // 8:]
    i8[:] = (torch.randint(-126, 126, i8.shape, generator=g) + 0.5) * 2.0 ** -7
    i8[:, ::8] = 127 * 2.0 ** -7
    i4[:] = (torch.randint(0, 15, i4.shape, generator=g) + 0.5) * 2.0 ** -7
    i4[:, ::8], i4[:, 1::8] = 0.0, 15 * 2.0 ** -7
    return x


def _bits(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.view(torch.int16) if t.dtype == torch.float16 else t


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [HD, 32, 8, 2])
def test_c_quantizer_is_the_python_one_bit_for_bit(bits, group):
    x = _adversarial()
    q, s, z = QuantizedKVCache(1, 1, 1, HD, 1, bits=bits, group_size=group)._quantize(x[None, None])
    cq, cs, cz = native_step.kv_quantize(x, bits, group)
    assert torch.equal(cq, q[0, 0])
    assert torch.equal(_bits(cs), _bits(s[0, 0]))
    assert (z is None and cz is None) or torch.equal(_bits(cz), _bits(z[0, 0]))


class _Recording(QuantizedKVCache):
    """The eager cache, also keeping the float k/v each update quantized: {(layer, kind): [(B, H, T, hd)]}."""

    def update(self, layer_idx, k, v, input_pos):
        for kind, x in enumerate((k, v)):
            self.inputs.setdefault((layer_idx, kind), []).append(x.float().clone())
        return super().update(layer_idx, k, v, input_pos)


def _slots(cache, layer: int, kind: int, pos: int):
    """(codes, scales, zeros) of one position, all kv heads."""
    z = None if cache.zeros is None else _bits(cache.zeros[kind][layer][0, :, pos])
    return cache.codes[kind][layer][0, :, pos], _bits(cache.scales[kind][layer][0, :, pos]), z


def _quantized_variants(cache, x: torch.Tensor, n: int = 32, rel: float = 1e-5):
    """_quantize of x (H, hd) and of n copies with each value moved by up to ``rel`` relative: the
    codes a float-rounding difference in x could give."""
    g = torch.Generator().manual_seed(1)
    xs = [x] + [x * (1 + rel * (2 * torch.rand(x.shape, generator=g) - 1)) for _ in range(n)]
    return [tuple(_bits(t[0, :, 0]) if t is not None else None for t in cache._quantize(v[None, :, None]))
            for v in xs]


def _same(a, b) -> bool:
    return all((u is None and w is None) or torch.equal(u, w) for u, w in zip(a, b))


@torch.inference_mode()
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [None, 4])
def test_native_writes_the_eager_cache_and_logits(bits, group):
    """12 greedy steps, eager and native side by side. Each new slot (layer, k/v, position) is compared
    bit for bit with the eager one. The two steps compute k and v in float with different rounding
    (C norms/RoPE/attention vs torch's, ~1e-7 relative), so a value sitting on a rounding boundary may
    legitimately quantize to the neighbouring code: a slot that differs must be one that a 1e-5
    relative nudge of the eager input also flips to, and such slots must be rare."""
    m = tiny_model()
    assert "native C decode step" in prepare_cpu_decode(m)
    ids = torch.randint(0, m.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    ca = _Recording.for_model(m, 1, 40, bits, group)
    ca.inputs = {}
    cb = QuantizedKVCache.for_model(m, 1, 40, bits, group)
    la = m(ids, ca, num_logits=1)[:, -1]
    m(ids, cb, num_logits=1)
    step = native_step.native_step(m, cb, 1)
    assert step is not None, native_step.why_not(m, cb, 1)
    t, err, exact, slots = la.argmax(-1), 0.0, 0, 0
    for _ in range(12):
        pos = ca.length
        la = m(t[:, None], ca, num_logits=1)[:, -1]
        lb = step(t[:, None], pos)
        cb.length = pos + 1
        err = max(err, ((la - lb).abs().max() / la.abs().max()).item())
        assert torch.equal(la.argmax(-1), lb.argmax(-1))
        for layer in range(m.config.num_hidden_layers):
            for kind in (0, 1):
                mine, ref = _slots(cb, layer, kind, pos), _slots(ca, layer, kind, pos)
                slots += 1
                if _same(mine, ref):
                    exact += 1
                    continue
                x = ca.inputs[(layer, kind)][-1][0, :, 0]  # (H, hd): the eager input of this slot
                assert any(_same(mine, v) for v in _quantized_variants(ca, x)), (layer, kind, pos)
        t = la.argmax(-1)
    assert err <= 1e-5, err
    assert exact >= 0.95 * slots, (exact, slots)
    n = ca.length
    for a, b in zip(ca.codes + ca.scales + (ca.zeros or []), cb.codes + cb.scales + (cb.zeros or [])):
        assert torch.equal(_bits(a[..., :7, :]), _bits(b[..., :7, :]))  # the prefill's slots: untouched
        assert not b[..., n:, :].any()                                     # nothing past the last step


@torch.inference_mode()
@pytest.mark.parametrize("weights,tol", [("bf16", 0.03), ("w4", 1e-5)])
def test_quantized_cache_with_16bit_and_w4_weights(weights, tol):
    """The cache path composes with the other weight kernels: bf16 weights (eager rounds activations to
    bf16 after every op and dequantizes the cache to bf16, the native step keeps fp32: 16-bit rounding) and
    RTN W4 g32 on cpu_qgemv (the same products: float rounding)."""
    m = tiny_model(num_hidden_layers=3)
    if weights == "bf16":
        m = m.to(torch.bfloat16)
    else:
        apply(m, RTNConfig(4, 32, symmetric=True), inplace=True, pack=True, progress=False)
    assert "native C decode step" in prepare_cpu_decode(m)
    ids = torch.randint(0, m.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    ca, cb = (QuantizedKVCache.for_model(m, 1, 40, 4, 8) for _ in range(2))
    t = m(ids, ca, num_logits=1)[:, -1].argmax(-1)
    m(ids, cb, num_logits=1)
    step, err = native_step.native_step(m, cb, 1), 0.0
    for _ in range(12):
        pos = ca.length
        la = m(t[:, None], ca, num_logits=1)[:, -1].float()
        lb = step(t[:, None], pos)
        cb.length = pos + 1
        err = max(err, ((la - lb).abs().max() / la.abs().max()).item())
        assert torch.equal(la.argmax(-1), lb.argmax(-1))
        t = la.argmax(-1)
    assert err < tol, err


@pytest.mark.parametrize("bits", [8, 4])
def test_generate_takes_the_native_step_on_a_kv_quantized_model(bits, monkeypatch):
    m = tiny_model(num_hidden_layers=3)
    apply(m, KVCacheQuantConfig(bits=bits, group_size=8), inplace=True)
    ref = copy.deepcopy(m)
    assert "native C decode step" in prepare_cpu_decode(m)
    calls, made = [], []
    call, init = native_step.NativeStep.__call__, native_step.NativeStep.__init__

    def spy_init(self, model, cache):
        made.append(cache)
        init(self, model, cache)

    monkeypatch.setattr(native_step.NativeStep, "__init__", spy_init)
    monkeypatch.setattr(native_step.NativeStep, "__call__", lambda self, *a: calls.append(1) or call(self, *a))
    prompt, cfg = [5, 9, 2, 77, 31], SamplingConfig(max_new_tokens=20)
    out = generate(m, prompt, cfg)
    assert len(made) == 1 and isinstance(made[0], QuantizedKVCache) and made[0].bits == bits
    assert len(calls) == 19  # every step after the prefill's token
    assert out.tokens == generate(ref, prompt, cfg).tokens


def test_quantized_cache_refusals_name_the_reason():
    m = tiny_model()
    prepare_cpu_decode(m)
    assert native_step.why_not(m, QuantizedKVCache.for_model(m, 1, 16, 4, 4), 1) is None
    assert "batch 2" in native_step.why_not(m, QuantizedKVCache.for_model(m, 2, 16, 8), 2)
    other = QuantizedKVCache.for_model(tiny_model(num_key_value_heads=4), 1, 16, 8)
    assert "quantized cache buffer" in native_step.why_not(m, other, 1)
    odd = QuantizedKVCache.for_model(m, 1, 16, 8)
    odd.bits = 2
    assert "2-bit codes" in native_step.why_not(m, odd, 1)
    padded = QuantizedKVCache.for_model(m, 1, 16, 8)
    padded.mark_keys(torch.arange(2), torch.tensor([[False, True]]))
    assert "padding" in native_step.why_not(m, padded, 1)
    with pytest.raises(ValueError, match="group_size 6 must divide head_dim 64"):
        native_step.kv_quantize(torch.zeros(2, HD), 8, 6)
