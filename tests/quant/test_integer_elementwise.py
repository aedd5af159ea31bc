"""Integer steps for table activations, squeeze-excite products, concatenation and channel
split/shuffle (issue #16): each step against an independent float64 reference with its error in
LSB, then squeeze-excite and shuffle blocks converted strictly, with the fast int8 kernels and ONNX
Runtime checked against the integer reference."""

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.errors import UnsupportedError
from efficientml.models.mobilenetv3 import SqueezeExcite
from efficientml.models.shufflenetv2 import ShuffleUnit
from efficientml.quant.integer import IntegerConfig, QParams, convert_integer
from efficientml.quant.integer_elementwise import CatStep, LutStep, MulStep

CFG = IntegerConfig(warn_slow_layers=False)
_erf = np.vectorize(math.erf)


def _sig(x):
    return 1 / (1 + np.exp(-x))


# the activation as torch runs it, and its closed form in float64 (numpy), written independently
ACTS = {
    "hardswish": (nn.Hardswish(), lambda x: x * np.clip(x + 3, 0, 6) / 6),
    "hardsigmoid": (nn.Hardsigmoid(), lambda x: np.clip(x + 3, 0, 6) / 6),
    "silu": (nn.SiLU(), lambda x: x * _sig(x)),
    "sigmoid": (nn.Sigmoid(), _sig),
    "tanh": (nn.Tanh(), np.tanh),
    "gelu": (nn.GELU(), lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2)))),
    "leaky_relu": (nn.LeakyReLU(0.1), lambda x: np.where(x > 0, x, 0.1 * x)),
}


def _qp_for(lo, hi):
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255
    return QParams(scale, int(np.clip(round(-lo / scale), 0, 255)), 0, 255)


def _codes_err(got, real, qp):
    """|got − real code| in output LSB, the real code clamped to the grid."""
    return np.abs(got.numpy().astype(np.float64) - np.clip(real, qp.qmin, qp.qmax))


@pytest.mark.parametrize("op", list(ACTS))
def test_table_is_the_exactly_rounded_activation_of_every_code(op):
    mod, ref = ACTS[op]
    qi = QParams(0.045, 140, 0, 255)                                   # inputs −6.3 … 5.2
    x = (np.arange(256) - qi.zero_point) * qi.scale
    qo = _qp_for(ref(x).min(), ref(x).max())
    st = LutStep("act", mod, op)
    st.in_qp, st.out_qp = [qi], qo
    st.finalize(CFG)
    got = st.integer(torch.arange(256, dtype=torch.int32))
    err = _codes_err(got, ref(x) / qo.scale + qo.zero_point, qo)
    assert err.max() <= 0.5 + 1e-6, (op, err.max())                   # ≤ 0.5 LSB: exactly rounded
    q = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.int32)
    fast = st.fast(torch._make_per_tensor_quantized_tensor(q.to(torch.uint8), qi.scale, qi.zero_point))
    assert torch.equal(fast.int_repr().to(torch.int32), st.integer(q))          # fast: the same table


def _step(cls, qps, out, *a):
    st = cls("s", *a)
    st.in_qp, st.out_qp = qps, out
    st.finalize(CFG)
    return st


def _quint8(q, qp):
    return torch._make_per_tensor_quantized_tensor(q.to(torch.uint8), qp.scale, qp.zero_point)


def test_mul_broadcasts_and_rounds_the_exact_product():
    torch.manual_seed(0)
    qa, qb, qo = QParams(0.04, 120, 0, 255), QParams(1 / 255, 0, 0, 255), QParams(0.03, 100, 0, 255)
    st = _step(MulStep, [qa, qb], qo)
    a = torch.randint(0, 256, (2, 8, 5, 5), dtype=torch.int32)           # (N, C, H, W) features
    b = torch.randint(0, 256, (2, 8, 1, 1), dtype=torch.int32)           # (N, C, 1, 1) gate
    real = ((a.double() - 120) * b.double() * (qa.scale * qb.scale / qo.scale) + 100).numpy()
    got = st.integer(a, b)
    assert got.shape == (2, 8, 5, 5) and _codes_err(got, real, qo).max() <= 0.5 + 1e-4
    fast = st.fast(_quint8(a, qa), _quint8(b, qb)).int_repr().to(torch.int32)
    diff = (fast - got).abs()
    assert int(diff.max()) <= 1 and float((diff == 0).float().mean()) > 0.99
    assert torch.equal(_step(MulStep, [qb, qa], qo).integer(b, a), got)          # either operand order


def test_cat_requantizes_each_input_to_the_shared_grid():
    qs = [QParams(0.02, 10, 0, 255), QParams(0.05, 128, 0, 255), QParams(0.03, 60, 0, 255)]
    qo = qs[2]                                                             # the third is already on it
    st = _step(CatStep, qs, qo, 1)
    xs = [torch.randint(0, 256, (2, c, 3, 3), dtype=torch.int32) for c in (4, 5, 6)]
    got = st.integer(xs)
    assert got.shape == (2, 15, 3, 3) and torch.equal(got[:, 9:], xs[2])          # copied exactly
    real = torch.cat([(x.double() - qp.zero_point) * qp.scale for x, qp in zip(xs, qs)], 1)
    assert _codes_err(got, (real / qo.scale + qo.zero_point).numpy(), qo).max() <= 0.5 + 1e-4
    fast = st.fast([_quint8(x, qp) for x, qp in zip(xs, qs)]).int_repr().to(torch.int32)
    assert int((fast - got).abs().max()) <= 1


class _Functional(nn.Module):
    """Every activation in function / method form, arithmetic with constants, one concatenation."""

    def __init__(self):
        super().__init__()
        self.conv, self.mix = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(88, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        parts = [F.hardswish(y), torch.sigmoid(y), y.sigmoid(), F.silu(y), F.gelu(y, approximate="tanh"),
                 F.leaky_relu(y, 0.2), (y + 3) / 6, 1 - y.tanh(), F.hardsigmoid(y), torch.tanh(y), F.gelu(y)]
        return self.mix(torch.cat(parts, dim=1))


def _tf_se_block(gate, act):
    """TF-ported MBConv: ZeroPad2d + stride-2 conv, depthwise, squeeze-excite, projection, head."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 16, 3, 2, bias=False), nn.BatchNorm2d(16), act(),
                      nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), act(),
                      SqueezeExcite(16, 4, act=act, gate=gate),
                      nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.3, 0.3), mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


class _SliceShuffle(nn.Module):
    """Channel split by slicing and torch.split, shuffle by reshape/permute/flatten, sizes from x.shape."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c // 2, c // 2, 1), nn.ReLU())

    def forward(self, x):
        c = x.shape[1] // 2
        a, b = x[:, :c], x[:, c:]
        a1, a2 = torch.split(self.conv(a), [c // 2, c - c // 2], dim=1)
        y = torch.cat([a2, b, a1], 1)
        n, ch, h, w = y.size()
        return y.reshape(n, 2, ch // 2, h, w).permute(0, 2, 1, 3, 4).flatten(1, 2)


def _shuffle_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), ShuffleUnit(16, 32, 2), ShuffleUnit(32, 32, 1),
                         _SliceShuffle(32), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def _sqnr(ref, out):
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


def _check(model, x, expect_steps, sqnr_min):
    """Strict conversion, the steps expected, accuracy vs fp32, integer vs emulation (per layer),
    fast kernels vs integer (end to end); returns the integer model."""
    im = convert_integer(model, [x], CFG)
    rep = im.report()
    assert rep["float_layers"] == [] and all(rep["steps"].get(k) == n for k, n in expect_steps.items()), rep
    with torch.no_grad():
        assert _sqnr(model(x), im(x)) >= sqnr_min
    assert max(im.layer_lsb_differences(x).values()) <= 1
    diff = (im.integer_output(x, "integer") - im.integer_output(x, "fast")).abs()
    assert int(diff.max()) <= 1 and float((diff == 0).float().mean()) > 0.9
    return im


def _ort_vs_integer(im, x, ops_present):
    pytest.importorskip("onnxruntime")
    from efficientml.quant.export import export_onnx, ort_kernel_counts, run_onnx

    with tempfile.TemporaryDirectory() as d:
        path = export_onnx(im, Path(d) / "m.onnx", x[:1])
        counts = ort_kernel_counts(path)
        out = run_onnx(path, x)
    assert counts["qlinearconv_fraction"] == 1.0 and all(counts["ops"].get(o, 0) > 0 for o in ops_present), counts
    with torch.no_grad():
        lsb = float((out - im(x)).abs().max()) / im.output_qparams.scale
    return round(lsb, 3)                   # float output: LSB up to float rounding


def test_function_and_method_forms_convert_to_tables():
    torch.manual_seed(0)
    m, x = _Functional().eval(), torch.randn(4, 3, 12, 12)
    im = _check(m, x, {"lut": 13, "cat": 1, "conv2d": 2}, 30.0)
    lsb = _ort_vs_integer(im, x, ("QLinearConcat", "QLinearSigmoid"))
    assert lsb <= 1, lsb


@pytest.mark.parametrize("gate,act", [(nn.Sigmoid, nn.SiLU), (nn.Hardsigmoid, nn.Hardswish)])
def test_squeeze_excite_block_tf_style(gate, act):
    m, x = _tf_se_block(gate, act), torch.randn(8, 3, 32, 32)
    im = _check(m, x, {"mul": 1, "lut": 4, "pad": 1, "mean": 2}, 25.0)
    pool = next(i.step for i in im.program.instrs if i.step.name == "7.avgpool")     # the SE's mean
    assert pool.out_qp.scale < pool.in_qp[0].scale / 2        # its own calibrated grid, finer than its input's
    assert _ort_vs_integer(im, x, ("QLinearMul",)) <= 1


def test_shuffle_blocks_split_concat_and_shuffle():
    m, x = _shuffle_net(), torch.randn(4, 3, 32, 32)
    im = _check(m, x, {"cat": 3, "shape": 24, "move": 18}, 30.0)
    assert _ort_vs_integer(im, x, ("QLinearConcat", "Split", "Transpose", "Reshape")) <= 1


def test_ops_without_an_integer_step_are_still_named():
    class _Sub(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 1)

    with pytest.raises(UnsupportedError, match=r"layer 'cumsum' \(cumsum\) has no integer implementation"):
        convert_integer(_Sub().eval(), [torch.randn(2, 4)], CFG)
