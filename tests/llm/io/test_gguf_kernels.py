"""GGUF quantized matrices loaded straight onto the quantized CPU kernel: the codes as stored (their
dequantized values equal both our float reader's and gguf-py's, bit for bit), the model's linears all
kernel modules with no float copy, and the built-in SmolLM2 GGUF (Q4_1, Q8_0 embedding) decoding on them."""

import numpy as np
import pytest
import torch

from efficientml.llm.io.ggml_quants import dequantize_blocks
from efficientml.llm.io.gguf import TensorInfo
from efficientml.llm.io.gguf_kernels import KERNEL_KINDS, qweight_of
from efficientml.llm.io.load import load
from efficientml.llm.kernels import cpu_qgemv
from efficientml.llm.kernels.qgemv_linear import QGemvLinear

BLOCK = {"Q4_0": (32, 18, (0,)), "Q4_1": (32, 20, (0, 2)), "Q8_0": (32, 34, (0,)), "Q4_K": (256, 144, (0, 2)),
         "Q5_0": (32, 22, (0,)), "Q5_1": (32, 24, (0, 2)), "Q5_K": (256, 176, (0, 2))}


def _random_blocks(kind: str, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Random bytes in ``kind``'s block layout, every f16 field a finite value of either sign."""
    n, size, f16_at = BLOCK[kind]
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, size=(shape[0] * shape[1] // n, size), dtype=np.uint8)
    for at in f16_at:
        b[:, at:at + 2] = rng.uniform(-0.05, 0.05, size=(b.shape[0], 1)).astype(np.float16).view(np.uint8)
    return b.reshape(-1)


@pytest.mark.parametrize("kind", KERNEL_KINDS)
def test_kernel_layout_holds_the_stored_values(kind):
    shape = (24, 512)
    raw = _random_blocks(kind, shape)
    w = qweight_of(TensorInfo("blk.0.ffn_up.weight", kind, shape, raw))
    ours = torch.from_numpy(dequantize_blocks(raw, kind, shape[0] * shape[1]).reshape(shape))
    assert torch.equal(w.dequantize(), ours)
    gguf = pytest.importorskip("gguf")
    theirs = gguf.quants.dequantize(raw.reshape(shape[0], -1), getattr(gguf.GGMLQuantizationType, kind))
    assert torch.equal(w.dequantize(), torch.from_numpy(np.asarray(theirs, dtype=np.float32)))


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_0", "Q5_1", "Q5_K"])
def test_kernel_product_matches_dequantized_matmul(kind):
    if not cpu_qgemv.available():
        pytest.skip(cpu_qgemv.status())
    shape = (64, 512)
    w = qweight_of(TensorInfo("x", kind, shape, _random_blocks(kind, shape, 1)))
    assert w.bits == (4 if kind == "Q4_K" else 8)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(0))
    ref = x @ w.dequantize().T
    err = (QGemvLinear(w)(x) - ref).abs().max() / ref.abs().max()
    assert err < 0.02  # activations int8 per block of 32 (W4A8); measured ~0.5 %


def test_other_types_are_left_to_the_float_path():
    assert qweight_of(TensorInfo("x", "Q6_K", (4, 256), np.zeros(4 * 210, np.uint8))) is None
    assert qweight_of(TensorInfo("x", "Q4_0", (4, 48), np.zeros(4 * 18, np.uint8))) is None  # rows not in 32s


@pytest.mark.skipif(not cpu_qgemv.available(), reason="the quantized CPU kernel is not built")
def test_builtin_smollm2_gguf_runs_as_stored(smollm2):
    """SmolLM2-135M's GGUF: every q/k/v/o/gate/up/down a QGemvLinear with the file's Q4_1 codes (equal,
    dequantized, to the float load), lm_head from the tied Q8_0 embedding, and no float copy of them."""
    from efficientml.llm.generate import SamplingConfig, generate
    from efficientml.llm.kernels.decode import prepare_cpu_decode

    base, tok = smollm2
    m, _ = load("smollm2-135m", keep_quantized=True)
    kernel = {n: mod for n, mod in m.named_modules() if isinstance(mod, QGemvLinear)}
    assert len(kernel) == 7 * m.config.num_hidden_layers + 1 and "lm_head" in kernel
    floats = dict(base.named_modules())
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.7.self_attn.k_proj", "model.layers.29.mlp.down_proj"):
        assert torch.equal(kernel[name].qweight.dequantize(), floats[name].weight)
    assert kernel["model.layers.3.mlp.up_proj"].m is not None  # Q4_1's offsets
    assert torch.equal(kernel["lm_head"].qweight.dequantize(), base.model.embed_tokens.weight)
    assert not any(p.dim() == 2 for n, p in m.named_parameters() if not n.startswith("model.embed_tokens"))
    assert "native C decode step" in prepare_cpu_decode(m)
    out = generate(m, tok.encode("The capital of France is"), SamplingConfig(max_new_tokens=8))
    assert len(out.tokens[0]) == 8
