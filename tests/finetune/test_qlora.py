"""QLoRA: the packed NF4 base equals our NF4 number format (up to the double-quantized scales), is
~4.13 bits per weight, trains through dequantize-in-backward with the gradients of the dense path,
and the 8-bit AdamW follows fp32 AdamW."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from efficientml import apply
from efficientml.core.errors import ConfigError
from efficientml.finetune import LoRAConfig, NF4Linear, QLoRAConfig, adapters, merge_and_unload, trainable_parameters
from efficientml.finetune.optim8bit import AdamW8bit
from efficientml.quant.formats import get_format

from ..llm.conftest import tiny_model


def test_nf4_base_matches_the_nf4_format():
    w = torch.randn(96, 128)
    plain = NF4Linear(w, double_quant=False)
    torch.testing.assert_close(plain.dequantize(), get_format("nf4").quantize(w), atol=0, rtol=0)
    dq = NF4Linear(w)  # double-quantized block scales: within 1% of the fp32 absmax, same SQNR to 0.2 dB
    absmax = w.reshape(-1, 64).abs().amax(1)
    assert ((dq.block_absmax() - absmax).abs() / absmax).max() <= 0.01

    def sqnr(q):
        return (10 * torch.log10(w.pow(2).sum() / (q - w).pow(2).sum())).item()

    assert sqnr(dq.dequantize()) > 19.0 and abs(sqnr(dq.dequantize()) - sqnr(plain.dequantize())) < 0.2
    n = w.numel()  # codes n/2, int8 absmax n/64, fp32 scale per 256 blocks, fp32 offset
    assert dq.nbytes() == n // 2 + n // 64 + 4 * -(-n // (64 * 256)) + 4
    assert plain.nbytes() == n // 2 + 4 * n // 64


def test_nf4_linear_gradient_equals_dense():
    lin = nn.Linear(64, 48)
    q = NF4Linear.from_linear(lin)
    dense = nn.Linear(64, 48)
    with torch.no_grad():
        dense.weight.copy_(q.dequantize())
        dense.bias.copy_(lin.bias)
    x1 = torch.randn(3, 5, 64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    q(x1).square().sum().backward()
    dense(x2).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)


def test_qlora_model_trains_and_merges():
    model = apply(tiny_model(), QLoRAConfig(rank=4, alpha=8)).model
    assert all(isinstance(m.base_layer, NF4Linear) for _, m in adapters(model))
    assert not any(isinstance(m, nn.Linear) and m.weight.numel() > 64 * 64 - 1 and m.weight.requires_grad
                   for m in model.modules())
    lora = apply(tiny_model(), LoRAConfig(rank=4, alpha=8)).model
    assert trainable_parameters(model) == trainable_parameters(lora)
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 128), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    with torch.no_grad():
        out = model(ids)
        merged = merge_and_unload(model)
        assert (merged(ids) - out).abs().max() <= 1e-4
    with pytest.raises(ConfigError, match="even integer"):
        QLoRAConfig(block=63)


def test_adamw8bit_first_step_is_adams():
    w32 = nn.Parameter(torch.randn(64, 128))
    w8 = nn.Parameter(w32.detach().clone())
    g = torch.randn(64, 128)
    for w, cls in ((w32, torch.optim.AdamW), (w8, AdamW8bit)):
        opt = cls([w], lr=1e-2, weight_decay=0.01)
        w.grad = g.clone()
        opt.step()
        w.grad = g.clone() * 0.5
        opt.step()  # the second step reads the quantized moments back
    d = (w8 - w32).abs()  # dynamic 8-bit moments: small entries of a block are coarser
    assert d.max() <= 0.1 * 1e-2 and d.mean() <= 0.01 * 1e-2
    from efficientml.finetune.optim8bit import SIGNED, UNSIGNED
    assert len(SIGNED.values) == 255 and len(UNSIGNED.values) == 256  # codes fit a uint8


def test_adamw8bit_follows_fp32_adamw():
    torch.manual_seed(0)
    target = torch.randn(64, 128)
    x = torch.randn(256, 128)
    runs = {}
    for name, cls in (("fp32", torch.optim.AdamW), ("8bit", AdamW8bit)):
        w = nn.Parameter(torch.zeros(64, 128))
        b = nn.Parameter(torch.zeros(64))
        opt = cls([w, b], lr=1e-2, weight_decay=0.01)
        for _ in range(60):
            loss = (x @ w.T + b - x @ target.T).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        runs[name] = (w.detach().clone(), loss.item(), opt)
    (w32, l32, _), (w8, l8, opt8) = runs["fp32"], runs["8bit"]
    assert abs(l8 - l32) <= 0.03 * l32  # the same descent (measured: 0.8% apart after 60 steps)
    assert (w8 - w32).norm() <= 0.1 * w32.norm()  # each step moves ±lr; rounding flips a few signs
    fp32_bytes = 2 * 4 * (64 * 128 + 64)
    assert opt8.state_bytes() <= 0.3 * fp32_bytes  # 8-bit codes + block scales; the bias stays fp32
