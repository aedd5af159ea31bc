import pytest
import torch

from efficientml.core.errors import ConfigError
from efficientml.data.digits import DIGITS_MEAN, DIGITS_STD, digits_dataset, load_digits


def test_shapes_and_split():
    x, y = load_digits("all")
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert x.min().item() == 0.0 and x.max().item() == 1.0
    assert torch.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert abs(x.mean().item() - DIGITS_MEAN) < 1e-4 and abs(x.std(unbiased=False).item() - DIGITS_STD) < 1e-4
    xtr, ytr = load_digits("train")
    xte, yte = load_digits("test")
    assert len(ytr) == 1438 and len(yte) == 359
    # the two parts partition the data: same multiset of labels and pixel sums
    assert torch.bincount(torch.cat([ytr, yte])).tolist() == torch.bincount(y).tolist()
    torch.testing.assert_close(xtr.sum() + xte.sum(), x.sum())


def test_deterministic_and_seeded():
    a = load_digits("test")[1]
    assert torch.equal(a, load_digits("test")[1])
    assert not torch.equal(a, load_digits("test", seed=1)[1])


def test_normalized_dataset():
    ds = digits_dataset("all", normalize=True)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    assert abs(x.mean().item()) < 1e-3 and abs(x.std(unbiased=False).item() - 1.0) < 1e-3
    with pytest.raises(ConfigError, match="split"):
        load_digits("validation")
