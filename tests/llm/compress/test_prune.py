import pytest
import torch

from efficientml import apply
from efficientml.core.errors import ConfigError
from efficientml.llm.compress import LLMPruneConfig, sparsity_of
from efficientml.llm.compress.stats import HessianAccumulator
from efficientml.llm.compress.magnitude import magnitude_mask, nm_mask
from efficientml.llm.compress.sparsegpt import sparsegpt_prune
from efficientml.llm.compress.wanda import wanda_score
from efficientml.llm.compress.magnitude import mask_from_score

from ..conftest import tiny_model


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_masks_exact(n, m):
    score = torch.randn(16, 64)
    keep = nm_mask(score, n, m)
    assert bool((keep.reshape(16, -1, m).sum(-1) == n).all())
    kept_min = torch.where(keep, score, torch.inf).reshape(16, -1, m).amin(-1)
    dropped_max = torch.where(~keep, score, -torch.inf).reshape(16, -1, m).amax(-1)
    assert bool((kept_min >= dropped_max).all())  # the n largest of every m


def test_wanda_keeps_small_weights_on_large_inputs():
    w = torch.tensor([[1.0, 0.1, 0.9, 0.2]])
    x_sq = torch.tensor([1.0, 400.0, 1.0, 1.0])  # channel 1 carries 20× larger activations
    cfg = LLMPruneConfig("wanda", sparsity=0.5)
    wanda = mask_from_score(wanda_score(w, x_sq), cfg, per_row=True)
    mag = magnitude_mask(w, LLMPruneConfig("magnitude", sparsity=0.5))
    assert wanda.tolist() == [[True, True, False, False]]
    assert mag.tolist() == [[True, False, True, False]]


def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    x = torch.randn(1024, 64, generator=g) @ (torch.randn(64, 64, generator=g) / 4 + torch.eye(64))
    h = HessianAccumulator(64)
    h.add(x)
    errs = {}
    for nm in (None, (2, 4)):
        cfg = LLMPruneConfig("sparsegpt", 0.5, n_m=nm, block_size=16)
        ws, keep = sparsegpt_prune(w, h.value(), cfg)
        assert abs(1 - keep.float().mean().item() - 0.5) < 1e-6 and bool((ws[~keep] == 0).all())
        errs["sparsegpt", nm] = (x @ (ws - w).t()).pow(2).mean().item()
        wk = mask_from_score(wanda_score(w, x.pow(2).sum(0)), cfg, per_row=True)
        errs["wanda", nm] = (x @ (w * wk - w).t()).pow(2).mean().item()
        mk = magnitude_mask(w, cfg)
        errs["magnitude", nm] = (x @ (w * mk - w).t()).pow(2).mean().item()
        assert errs["sparsegpt", nm] < errs["wanda", nm] and errs["sparsegpt", nm] < errs["magnitude", nm]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_prune_model_reaches_sparsity(method, nm, calib):
    m = tiny_model()
    r = apply(m, LLMPruneConfig(method, 0.5, n_m=nm), calib=calib, inplace=True, progress=False).report
    assert abs(r["sparsity"] - 0.5) < 1e-3 and abs(sparsity_of(m) - 0.5) < 1e-3
    if nm:
        w = m.model.layers[0].mlp.down_proj.weight
        assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())


def test_prune_bad_input():
    with pytest.raises(ConfigError, match="n_m must be"):
        LLMPruneConfig("wanda", n_m=(4, 2))
    with pytest.raises(ConfigError, match="method must be one of"):
        LLMPruneConfig("random")
    with pytest.raises(ConfigError, match="needs calibration tokens"):
        apply(tiny_model(), LLMPruneConfig("wanda"), calib=None, inplace=True)
