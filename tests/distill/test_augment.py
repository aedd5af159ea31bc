"""Cutout and mixup: exact pixel counts, the mixing formula, the loss formula, one fit step by hand."""

import copy

import pytest
import torch
import torch.nn as nn

from efficientml.core.errors import ConfigError
from efficientml.distill import CutoutLoader, MixupLoader, cutout, mixup, mixup_loss
from efficientml.train import TrainConfig, fit


@pytest.mark.parametrize("size", [4, 5])
def test_cutout_zeroes_one_square_per_image(size):
    b, h, w = 64, 12, 10
    x = torch.rand(b, 3, h, w) + 1.0                                   # no pixel is 0 before
    out = cutout(x, size, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)                               # the same draws, by hand
    cy, cx = torch.randint(0, h, (b,), generator=g), torch.randint(0, w, (b,), generator=g)
    zero = out == 0                                                    # (B, 3, H, W)
    assert torch.equal(zero[:, 0], zero[:, 1]) and torch.equal(zero[:, 0], zero[:, 2])   # all channels
    assert torch.equal(out[~zero], x[~zero])
    interior = 0
    for i in range(b):
        y0, x0 = int(cy[i]) - size // 2, int(cx[i]) - size // 2
        expected = torch.zeros(h, w, dtype=torch.bool)
        expected[max(0, y0):max(0, y0 + size), max(0, x0):max(0, x0 + size)] = True
        assert torch.equal(zero[i, 0], expected), i
        if y0 >= 0 and x0 >= 0 and y0 + size <= h and x0 + size <= w:
            assert int(zero[i, 0].sum()) == size * size
            interior += 1
    assert 0 < interior < b                                            # both cases were exercised


def test_cutout_rejects_non_images():
    with pytest.raises(ConfigError, match="B, C, H, W"):
        cutout(torch.ones(3, 8, 8), 2)


def test_mixup_output_is_the_convex_combination():
    x = torch.randn(10, 2, 4, 4)
    y = torch.arange(10)                                               # unique labels reveal the permutation
    xm, y_a, y_b, lam = mixup(x, y, 0.4, torch.Generator().manual_seed(3))
    assert 0.0 < lam < 1.0 and torch.equal(y_a, y)
    assert sorted(y_b.tolist()) == list(range(10)) and not torch.equal(y_b, y)
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x[y_b], rtol=0, atol=1e-7)
    xm0, _, _, lam0 = mixup(x, y, 0.0, torch.Generator().manual_seed(3))
    assert lam0 == 1.0 and torch.equal(xm0, x)


def test_mixup_loss_equals_the_formula():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64)
    ya, yb = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)
    logp = z - z.exp().sum(1, keepdim=True).log()
    lam = 0.3
    ref = -(lam * logp.gather(1, ya[:, None]) + (1 - lam) * logp.gather(1, yb[:, None])).mean()
    torch.testing.assert_close(mixup_loss(z, ya, yb, lam), ref)


def _batches():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]


def test_one_fit_step_with_mixup_and_cutout_is_sgd_on_the_mixup_loss():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    ref = copy.deepcopy(model)
    by_hand = MixupLoader(CutoutLoader(_batches(), 3, seed=5), alpha=1.0, seed=7)
    xm, ya = next(iter(by_hand))
    loss = by_hand.loss_fn(ref(xm), ya)
    torch.testing.assert_close(loss, mixup_loss(ref(xm), ya, by_hand._y_b, by_hand._lam))
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    loader = MixupLoader(CutoutLoader(_batches(), 3, seed=5), alpha=1.0, seed=7)
    cfg = TrainConfig(epochs=1, lr=0.5, max_steps=1, momentum=0.0, weight_decay=0.0, schedule="constant",
                      warmup_frac=0.0)
    fit(model, loader, cfg, loss_fn=loader.loss_fn, progress=False)
    for p, p0, gr in zip(model.parameters(), ref.parameters(), grads):
        torch.testing.assert_close(p.detach(), p0.detach() - 0.5 * gr, rtol=1e-5, atol=1e-6)
    assert len(loader) == 4
