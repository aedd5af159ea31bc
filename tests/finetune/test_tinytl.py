"""TinyTL on a CIFAR ResNet: starts as the base model, its activation-free frozen ops give the same
gradients as PyTorch's own layers, its measured saved activations are a fraction of full fine-tuning's,
and its trained state saves and loads exactly."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml import apply
from efficientml.core.errors import ConfigError
from efficientml.finetune import (BitFitConfig, LastLayerConfig, TinyTLConfig, load_trainable, save_trainable,
                                  training_memory)
from efficientml.finetune.lean_ops import FrozenBatchNorm2d, FrozenConv2d, lean_activations, pack_mask, unpack_mask
from efficientml.finetune.tinytl import freeze_batchnorm_stats
from efficientml.models.registry import build_model


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _base():
    torch.manual_seed(0)
    m = build_model("resnet20")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial running statistics, as a trained model has
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.normal_(0, 0.1, generator=g)
                bn.running_var.uniform_(0.5, 2.0, generator=g)
                bn.bias.normal_(0, 0.1, generator=g)
    return m.eval()


def test_relu_mask_packs_to_one_bit_exactly():
    mask = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(packed, mask.shape), mask)


def test_lean_ops_match_torch_gradients():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16).eval()
    with torch.no_grad():
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2), bn.weight.normal_()
    conv.weight.requires_grad_(False), bn.weight.requires_grad_(False)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    g = torch.randn(2, 16, 5, 5)
    F.relu(bn(conv(x))).backward(g)
    ref = x.grad.clone(), conv.bias.grad.clone(), bn.bias.grad.clone()
    x.grad = None
    fc, fb = FrozenConv2d(conv), FrozenBatchNorm2d(bn)
    with lean_activations():
        y = F.relu(fb(fc(x)))
    y.backward(g)
    for a, b in zip(ref, (x.grad, fc.bias.grad, fb.bias.grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_mask_relu6_matches_torch():
    from efficientml.finetune.lean_ops import MaskReLU

    x = (torch.randn(4, 8, 5, 5, generator=torch.Generator().manual_seed(1)) * 5).requires_grad_()
    g = torch.randn(4, 8, 5, 5)
    F.relu6(x).backward(g)
    ref, x.grad = x.grad.clone(), None
    y = MaskReLU(6.0)(x)
    y.backward(g)
    assert torch.equal(y, F.relu6(x)) and torch.equal(x.grad, ref)


def test_tinytl_on_mobilenetv2_starts_as_the_base_and_keeps_few_activations():
    torch.manual_seed(0)
    base = build_model("mobilenetv2", num_classes=10).eval()
    x, y = _batch(4)
    result = apply(base, TinyTLConfig())
    assert len(result.layers) == 17 and result.report["lean"] == {"conv": 52, "batchnorm": 52, "relu": 35}
    with torch.no_grad():
        assert (result.model.eval()(x) - base(x)).abs().max() <= 1e-5
    full = apply(base, LastLayerConfig()).model.train()
    for p in full.parameters():
        p.requires_grad_(True)
    ratio = (training_memory(result.model.train(), x, y)["activation_bytes"]
             / training_memory(full, x, y)["activation_bytes"])
    assert ratio < 0.1  # measured: 0.06 (ReLU6 masks of 1 bit, no conv inputs kept)


def test_tinytl_starts_as_the_base_and_bias_gradients_equal_bitfit():
    x, y = _batch()
    base = _base()
    model = apply(base, TinyTLConfig()).model.eval()
    with torch.no_grad():
        assert (model(x) - base(x)).abs().max() <= 1e-5  # the lite residuals' 1×1 convs start at zero
    assert len([n for n in dict(model.named_modules()) if n.endswith(".lite_residual")]) == 9
    base, x = base.double(), x.double()  # float64: the two backward passes agree to rounding, not 1e-4
    lean = apply(base, TinyTLConfig(lite_residual=False)).model.train()
    plain = freeze_batchnorm_stats(apply(base, BitFitConfig(train_head=True)).model.train())
    F.cross_entropy(lean(x), y).backward()
    F.cross_entropy(plain(x), y).backward()
    ref = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    got = {n.replace(".block.", "."): p.grad for n, p in lean.named_parameters() if p.requires_grad}
    assert sorted(got) == sorted(ref) and len(ref) == 19 * 1 + 2  # 19 batch norms' shifts + head
    for n in ref:
        assert (got[n] - ref[n]).norm() <= 1e-10 * ref[n].norm(), n


def test_tinytl_keeps_a_fraction_of_full_fine_tunings_activations():
    x, y = _batch(16)
    base = _base()
    full = apply(base, LastLayerConfig()).model.train()
    for p in full.parameters():
        p.requires_grad_(True)
    m = {"full": training_memory(full, x, y),
         "last": training_memory(apply(base, LastLayerConfig(num_classes=10)).model, x, y),
         "bias": training_memory(apply(base, TinyTLConfig(num_classes=10, lite_residual=False)).model.train(), x, y),
         "tinytl": training_memory(apply(base, TinyTLConfig(num_classes=10)).model.train(), x, y)}
    act = {k: v["activation_bytes"] / m["full"]["activation_bytes"] for k, v in m.items()}
    assert m["full"]["activation_bytes"] > 20e6  # ResNet-20 at batch 16: ~24 MB kept for backward
    assert act["last"] < 0.001 and act["bias"] < 0.1 and act["tinytl"] < 0.3  # measured: 0.0002, 0.058, 0.23
    assert m["tinytl"]["total_bytes"] < 0.3 * m["full"]["total_bytes"]
    assert m["full"]["optimizer_bytes"] == 2 * 4 * m["full"]["trainable"]  # AdamW: two fp32 moments
    assert m["tinytl"]["trainable"] < 0.15 * m["full"]["trainable"]


def test_tinytl_state_roundtrip_and_errors(tmp_path):
    x, y = _batch()
    model = apply(_base(), TinyTLConfig(num_classes=10)).model.train()
    training_memory(model, x, y, lr=1e-2)  # one real step moves the trainable tensors
    save_trainable(model, tmp_path / "t", TinyTLConfig(num_classes=10))
    again, _ = load_trainable(_base(), tmp_path / "t")
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model.eval()(x))
    with pytest.raises(ConfigError, match="no residual block"):
        apply(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 2)), TinyTLConfig())
    with pytest.raises(ConfigError, match="num_classes must be"):
        TinyTLConfig(num_classes=0)
