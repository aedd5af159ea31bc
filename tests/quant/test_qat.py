import torch
import torch.nn as nn

from efficientml.quant.qat import QATConfig, QATLayer, export_qat, fake_quant_ste, prepare_qat


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 3))


def test_ste_passes_gradient_inside_range_only():
    x = torch.tensor([0.26, 0.5, 5.0], requires_grad=True)
    y = fake_quant_ste(x, torch.tensor(0.1), torch.tensor(0.0), -10, 10)
    y.sum().backward()
    assert y.tolist()[:2] == [0.30000001192092896, 0.5] and x.grad.tolist() == [1.0, 1.0, 0.0]


def test_bn_folding_during_qat_and_export_drops_shadow_weights():
    m = _net()
    q = prepare_qat(m, QATConfig(weight_bits=4, lsq=True))
    assert isinstance(q[0], QATLayer) and q[0].bn is not None and isinstance(q[1], nn.Identity)
    opt = torch.optim.SGD(q.parameters(), lr=0.01)
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))
    q.train()
    for _ in range(3):
        loss = nn.functional.cross_entropy(q(x), y)
        opt.zero_grad(), loss.backward(), opt.step()
    assert q[0].step.grad is not None and q[0].layer.weight.grad is not None
    q.eval()
    exp = export_qat(q)
    sd = exp.state_dict()
    assert not any(k.endswith(".weight") for k in sd)                 # no float shadow weights
    assert sd["0.weight_int8"].dtype == torch.int8 and sd["0.weight_int8"].abs().max() <= 7
    torch.testing.assert_close(exp(x), q(x), atol=1e-4, rtol=1e-4)
