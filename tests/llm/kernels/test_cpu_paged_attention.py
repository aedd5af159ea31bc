"""The CPU paged-attention kernel against softmax(q kᵀ) v over each sequence's gathered keys."""

from __future__ import annotations

import math

import pytest
import torch

from efficientml.llm.kernels import cpu_paged_attention as pa

pytestmark = pytest.mark.skipif(not pa.available(), reason="the CPU paged-attention kernel did not build")


@pytest.mark.parametrize("window", [None, 5])
def test_paged_decode_attention_equals_dense_attention(window):
    g = torch.Generator().manual_seed(0)
    nb, bs, nkv, hd, nh = 20, 4, 2, 16, 6
    k, v = torch.randn(nb, bs, nkv, hd, generator=g), torch.randn(nb, bs, nkv, hd, generator=g)
    ctx = torch.tensor([1, 7, 13, 20])
    tables = torch.stack([torch.randperm(nb, generator=g)[:5] for _ in range(4)])  # scattered blocks
    q = torch.randn(4, nh, hd, generator=g)
    out = pa.paged_decode_attention(q, k, v, tables, ctx, 1 / math.sqrt(hd), window)
    for b in range(4):
        n = int(ctx[b])
        lo = max(0, n - window) if window else 0
        kk = k[tables[b]].reshape(-1, nkv, hd)[lo:n].transpose(0, 1).repeat_interleave(nh // nkv, 0)
        vv = v[tables[b]].reshape(-1, nkv, hd)[lo:n].transpose(0, 1).repeat_interleave(nh // nkv, 0)
        ref = torch.softmax(q[b][:, None] @ kk.transpose(1, 2) / math.sqrt(hd), -1) @ vv  # (nh, 1, hd)
        torch.testing.assert_close(out[b], ref[:, 0], atol=1e-5, rtol=0)


def test_limits_are_refused_in_one_sentence():
    k = torch.zeros(2, 4, 1, 8)
    assert pa.supports(k, 4) and not pa.supports(k, 17) and not pa.supports(k.double(), 4)
    with pytest.raises(ValueError, match="outside the kernel's limits"):
        pa.paged_decode_attention(torch.zeros(1, 17, 8), k, k, torch.zeros(1, 1, dtype=torch.long),
                                  torch.ones(1, dtype=torch.long), 1.0)
