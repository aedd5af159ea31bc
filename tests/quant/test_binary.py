import torch
import torch.nn as nn

from efficientml.quant.binary import (BinaryLayer, binarize, binarize_model, pack_signs, sign_matmul,
                                      twn_weight, xnor_linear, xnor_popcount_matmul)


def test_popcount_equals_pm1_matmul():
    g = torch.Generator().manual_seed(0)
    for k in (8, 61, 256):                            # includes padding bits
        a, b = torch.randn(17, k, generator=g), torch.randn(9, k, generator=g)
        got = xnor_popcount_matmul(pack_signs(a), pack_signs(b), k)
        assert torch.equal(got, sign_matmul(a, b).to(torch.int32))


def test_xnor_linear_matches_scaled_sign_matmul():
    torch.manual_seed(0)
    layer = BinaryLayer(nn.Linear(40, 6), "xnor")
    x = torch.randn(5, 40)
    torch.testing.assert_close(xnor_linear(x, layer), layer(x), atol=1e-5, rtol=1e-5)


def test_stochastic_binarization_mean():
    x = torch.full((100000,), 0.5)
    b = binarize(x, stochastic=True, generator=torch.Generator().manual_seed(0))
    assert set(b.unique().tolist()) == {-1.0, 1.0} and abs(b.mean().item() - 0.5) < 0.01


def test_twn_threshold_and_values():
    w = torch.randn(1000)
    t = twn_weight(w)
    d = 0.7 * w.abs().mean()
    assert bool((t[w.abs() <= d] == 0).all())
    alpha = w.abs()[w.abs() > d].mean()
    torch.testing.assert_close(t[w > d], torch.full_like(t[w > d], alpha.item()))


def test_ttq_learns_two_scales_and_model_wrapping():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    q, done = binarize_model(m, "ttq")
    assert done == ["2"]                              # first and last stay full precision
    q(torch.randn(2, 1, 8, 8)).sum().backward()
    layer = q[2]
    assert layer.wp.grad is not None and layer.wn.grad is not None
    assert len(layer.ternary_values()) == 3


def _vgg_and_images():
    from pathlib import Path

    from efficientml.data import fashion_mnist_loaders
    from efficientml.models import build_model
    from efficientml.train import load_checkpoint

    ckpt = Path(__file__).resolve().parents[2] / "checkpoints" / "vgg_fmnist.safetensors"
    model = load_checkpoint(ckpt)[0] if ckpt.is_file() else build_model("vgg", in_channels=1, width=0.25)
    x = next(iter(fashion_mnist_loaders(batch_size=64, augment=False, test_subset=64, eval_batch_size=64)[1]))[0]
    return model.eval(), x


def test_xnor_binarizes_preactivations_on_real_data():
    # XNOR-Net takes sign() of the BN output; after a ReLU every sign would be +1 and the net learns nothing
    model, x = _vgg_and_images()
    q, done = binarize_model(model, "xnor")
    positive: dict[str, float] = {}
    for name in done:
        q.get_submodule(name).register_forward_pre_hook(
            lambda m, inp, name=name: positive.__setitem__(name, (binarize(inp[0]) > 0).float().mean().item()))
    with torch.no_grad():
        q(x)
    assert sorted(positive) == sorted(done) and len(done) == 7
    for name, frac in positive.items():
        assert 0.05 < frac < 0.95, (name, frac)       # both signs occur in every binary layer's input
    # the ReLUs in front of binary layers are gone; the one before the full-precision classifier stays
    relus = [n for n, m in q.named_modules() if isinstance(m, nn.ReLU)]
    assert relus == ["backbone.relu7"]
    assert isinstance(q.backbone.relu0, nn.Identity)
    # other modes keep every ReLU
    assert sum(isinstance(m, nn.ReLU) for m in binarize_model(model, "bwn")[0].modules()) == 8


def test_xnor_rejects_functional_relu_before_binary_layer():
    import pytest

    from efficientml.core.errors import UnsupportedError

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            x = self.b(torch.nn.functional.relu(self.a(x)))
            return self.c(x.mean(dim=(2, 3)))

    with pytest.raises(UnsupportedError, match="functional"):
        binarize_model(Net(), "xnor")
    binarize_model(Net(), "bwn")                      # weight-only binarization does not care
