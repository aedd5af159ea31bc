"""Host kernels against the portable ones, called directly from a small C harness: the vector
requantization (every ISA the CPU has) against the scalar eml_requant on edge values (negative sums,
wrapping products, shifts outside the vector range), and the flat 3x3 depthwise (stride 1 and 2, odd
sizes, padding 0-2, in place) against the portable eml_depthwise."""

import ctypes
import subprocess

import pytest
import torch

from efficientml.engine.codegen import SOURCES, depthwise_scratch
from efficientml.engine.host import HOST_FLAGS, host_compiler

pytestmark = pytest.mark.skipif(host_compiler() is None, reason="no C compiler")

HARNESS = r"""
int t_rq(int isa, const int32_t *acc, int32_t n, int64_t beff, int32_t m0, int32_t shift, int32_t zout,
         int32_t lo, int32_t hi, uint8_t *y, uint8_t *ref) {
    int used = eml_set_isa(isa);
    eml_rq_pick(used)(acc, n, beff, m0, shift, zout, lo, hi, y);
    for (int32_t i = 0; i < n; i++) ref[i] = eml_requant((int64_t)acc[i] + beff, m0, shift, zout, lo, hi);
    return used;
}
int t_dw(int isa, const int32_t *f, const uint8_t *x, const int8_t *w, const int32_t *bias, const int64_t *beff,
         const int32_t *m0, const int8_t *sh, uint8_t *y, uint8_t *ref, uint8_t *scratch, int inplace) {
    eml_conv_t p = {f[0], f[1], f[2], f[0], 3, 3, f[3], f[3], f[4], f[4], 1, 1, f[0], f[5], f[6], f[7], f[8], 0, 255};
    int used = eml_set_isa(isa);
    eml_depthwise(&p, x, w, bias, m0, sh, ref, 0);
    if (inplace) {
        memcpy(y, x, (size_t)p.c * p.h * p.w);
        eml_depthwise_host(&p, y, w, beff, m0, sh, y, scratch);
    } else {
        eml_depthwise_host(&p, x, w, beff, m0, sh, y, scratch);
    }
    return used;
}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    d = tmp_path_factory.mktemp("harness")
    src = d / "h.c"
    src.write_text("\n".join(f.read_text() for f in SOURCES) + HARNESS)
    so = d / "h.so"
    subprocess.run([host_compiler(), *HOST_FLAGS, "-shared", "-fPIC", str(src), "-o", str(so)], check=True)
    return ctypes.CDLL(str(so))


def _p(t):
    return ctypes.c_void_p(t.data_ptr())


@pytest.mark.parametrize("isa", [0, 1, 2])
def test_requant_vector_matches_scalar(lib, isa):
    g = torch.Generator().manual_seed(isa)
    lib.t_rq.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32,
                         ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p]
    edge = torch.tensor([0, 1, -1, 2**31 - 1, -2**31, 2**30, -2**30, 12345, -12345], dtype=torch.int32)
    for shift in (-2, 0, 1, 2, 17, 31, 32, 40, 62, 63, 64, 70):
        for beff in (0, -3000, 2**40, -2**62):
            n = 45
            acc = torch.cat([edge, torch.randint(-2**31, 2**31 - 1, (n - len(edge),), generator=g, dtype=torch.int32)])
            if shift > 20:
                acc[20:] //= 2**12
            m0 = int(torch.randint(2**30, 2**31 - 1, (1,), generator=g))
            y, ref = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
            for zout, lo, hi in ((128, 0, 255), (0, 0, 6), (10, 3, 200)):
                lib.t_rq(isa, _p(acc), n, beff, m0, shift, zout, lo, hi, _p(y), _p(ref))
                assert torch.equal(y, ref), (isa, shift, beff, zout)


@pytest.mark.parametrize("isa", [0, 1, 2])
@pytest.mark.parametrize("c,h,w,s,pad", [(5, 7, 9, 1, 1), (3, 13, 11, 2, 1), (4, 8, 8, 2, 1), (2, 6, 17, 1, 0),
                                         (3, 9, 10, 2, 0), (2, 5, 5, 1, 2), (6, 30, 23, 2, 2)])
@pytest.mark.parametrize("inplace", [0, 1])
def test_depthwise_host_matches_portable(lib, isa, c, h, w, s, pad, inplace):
    g = torch.Generator().manual_seed(c * h + w)
    ho, wo = (h + 2 * pad - 3) // s + 1, (w + 2 * pad - 3) // s + 1
    zin, zout = 77, 130
    x = torch.randint(0, 256, (c, h, w), generator=g, dtype=torch.uint8)
    wt = torch.randint(-128, 128, (c, 9), generator=g, dtype=torch.int8)
    bias = torch.randint(-5000, 5000, (c,), generator=g, dtype=torch.int32)
    beff = bias.to(torch.int64) - zin * wt.to(torch.int64).sum(1)
    m0 = torch.randint(2**30, 2**31 - 1, (c,), generator=g, dtype=torch.int32)
    sh = torch.tensor([8, 12, 16, 63, 1, 0][:c] + [10] * max(0, c - 6), dtype=torch.int8)
    f = torch.tensor([c, h, w, s, pad, ho, wo, zin, zout], dtype=torch.int32)
    fields = dict(c=c, kh=3, kw=3, dh=1, dw=1, sh=s, sw=s, ho=ho, wo=wo)
    scratch = torch.empty(depthwise_scratch(fields) + 64, dtype=torch.uint8)
    y = torch.empty(max(c * h * w, c * ho * wo), dtype=torch.uint8)
    ref = torch.empty(c * ho * wo, dtype=torch.uint8)
    lib.t_dw(isa, _p(f), _p(x), _p(wt), _p(bias), _p(beff), _p(m0), _p(sh), _p(y), _p(ref), _p(scratch), inplace)
    assert torch.equal(y[:c * ho * wo], ref)
