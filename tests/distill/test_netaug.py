"""NetAug: the extracted tiny model is the supernet at width 1, wide gradients reach the shared weights."""

import copy

import pytest
import torch
import torch.nn.functional as F

from efficientml.core.errors import ConfigError
from efficientml.data.loader import ImageTensors, TensorLoader
from efficientml.distill import AugmentedNet, netaug_train
from efficientml.models import build_model
from efficientml.models.small_cnn import SmallCNN
from efficientml.train import TrainConfig

X = torch.randn(6, 1, 16, 16)


def _tiny():
    return build_model("small_cnn", in_channels=1, width=0.25, hidden=16)


def test_supernet_layers_are_the_tiny_ones_widened():
    tiny = _tiny()
    net = AugmentedNet(tiny, (1.5, 3.0), X[:2])
    conv1 = net.wide["4"]                                           # features.conv1: 8 → 16 channels tiny
    assert conv1.weight.shape == (48, 24, 3, 3) and net.wide["11"].weight.shape == (10, 48)   # classifier
    assert net.wide["9"].weight.shape == (48, 48 * 16)             # fc0 after the 4×4 pool and flatten
    assert torch.equal(conv1.weight[:16, :8], tiny.features.conv1.weight)
    assert torch.equal(net.wide["9"].weight[:16, :16 * 16], tiny.classifier.fc0.weight)
    assert net(X, 3.0).shape == net(X, 1.5).shape == (6, 10)
    with pytest.raises(ConfigError, match="width must lie"):
        net(X, 3.5)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_extracted_tiny_forward_equals_the_supernet_at_width_one(mode):
    tiny = _tiny()
    net = AugmentedNet(tiny, example_input=X[:2])
    with torch.no_grad():                                          # move the shared weights off the copy
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    net.wide["1"].running_mean.add_(0.3)
    out = net.extract()
    assert type(out) is SmallCNN and out is not tiny
    assert {k: v.shape for k, v in out.state_dict().items()} == {k: v.shape for k, v in tiny.state_dict().items()}
    getattr(net, mode)()
    getattr(out, mode)()
    torch.testing.assert_close(out(X), net(X, 1.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.features.bn0.running_mean, net.wide["1"].running_mean[:8], rtol=0, atol=0)
    torch.testing.assert_close(AugmentedNet(tiny, example_input=X[:2])(X), tiny.train()(X), rtol=0, atol=1e-6)


def test_wide_loss_reaches_the_shared_tiny_weights_and_width_one_only_its_own():
    net = AugmentedNet(_tiny(), example_input=X[:2])
    y = torch.randint(0, 10, (6,))
    w = net.wide["4"].weight                                         # (48, 24, 3, 3), tiny slice [:16, :8]
    F.cross_entropy(net(X, 2.0), y).backward()
    assert w.grad[:16, :8].abs().sum() > 0 and w.grad[16:32, :16].abs().sum() > 0
    assert w.grad[32:].abs().sum() == 0 and w.grad[:, 16:].abs().sum() == 0   # beyond width 2: untouched
    net.zero_grad()
    F.cross_entropy(net(X, 1.0), y).backward()
    assert w.grad[:16, :8].abs().sum() > 0 and w.grad[16:].abs().sum() == 0 and w.grad[:, 8:].abs().sum() == 0


def test_batch_norm_statistics_belong_to_the_tiny_network():
    tiny = _tiny().train()
    net = AugmentedNet(tiny, example_input=X[:2]).train()
    bn = net.wide["1"]
    before = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    net(X, 2.5)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.num_batches_tracked, before[1])
    net(X, 1.0)
    ref = copy.deepcopy(tiny).train()
    ref(X)
    torch.testing.assert_close(bn.running_mean[:8], ref.features.bn0.running_mean, rtol=0, atol=1e-7)
    torch.testing.assert_close(bn.running_var[:8], ref.features.bn0.running_var, rtol=0, atol=1e-7)


def test_any_plain_chain_and_a_clear_error_otherwise():
    mlp = build_model("mlp", in_features=16, hidden=(12, 8), num_classes=3)
    x = torch.randn(4, 16)
    net = AugmentedNet(mlp, (2.0,), x)
    assert net.wide["1"].weight.shape == (24, 16) and net.wide["3"].weight.shape == (16, 24)
    torch.testing.assert_close(net.extract()(x), mlp(x), rtol=0, atol=1e-6)
    with pytest.raises(ConfigError):
        AugmentedNet(build_model("resnet20", in_channels=1, width=0.25), example_input=X[:2])
    with pytest.raises(ConfigError, match="≥ 1"):
        AugmentedNet(_tiny(), (0.5, 2.0), X[:2])


def test_netaug_train_trains_the_tiny_model_in_place():
    g = torch.Generator().manual_seed(0)
    data = ImageTensors(torch.randint(0, 255, (48, 1, 12, 12), dtype=torch.uint8, generator=g),
                        torch.randint(0, 10, (48,), generator=g), (0.5,), (0.25,))
    tiny = _tiny()
    state0 = copy.deepcopy(tiny.state_dict())
    test = TensorLoader(data, 16)
    r = netaug_train(tiny, TensorLoader(data, 16, shuffle=True), TrainConfig(epochs=3, lr=0.05),
                     widths=(2.0, 3.0), alpha=0.5, eval_loader=test, progress=False)
    ep = r["history"]["epochs"]
    assert r["model"] is tiny and len(ep) == 3 and {"loss_tiny", "loss_wide"} <= set(ep[0])
    assert ep[0]["train_loss"] == pytest.approx(ep[0]["loss_tiny"] + 0.5 * ep[0]["loss_wide"], rel=1e-5)
    assert any(not torch.equal(v, state0[k]) for k, v in tiny.state_dict().items())
    net = r["supernet"].eval()
    tiny.eval()
    x = next(iter(test))[0]
    torch.testing.assert_close(tiny(x), net(x), rtol=0, atol=1e-6)
