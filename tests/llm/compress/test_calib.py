"""Calibration sets: one corpus as before, mixes with exact proportions, row j from source j mod k."""

import pytest
import torch

from efficientml.core.errors import ConfigError
from efficientml.llm.compress.calib import CalibConfig, calibration_sources, calibration_tokens


class _CharTok:
    """Token id = character code: the rows show which text they came from."""

    def encode(self, text, add_bos=False):
        return [ord(c) for c in text]


@pytest.fixture
def texts(tmp_path):
    (tmp_path / "a.txt").write_text("a" * 600)
    (tmp_path / "b.txt").write_text("b" * 600)
    (tmp_path / "c.txt").write_text("c" * 600)
    return [str(tmp_path / f"{x}.txt") for x in "abc"]


@pytest.mark.parametrize("n,k,counts", [(128, 2, (64, 64)), (128, 3, (43, 43, 42)), (5, 3, (2, 2, 1))])
def test_mix_proportions_are_exact(texts, n, k, counts):
    cfg = CalibConfig(",".join(texts[:k]), n_samples=n, seq_len=32)
    assert cfg.sources == tuple(texts[:k]) and cfg.counts() == counts
    toks = calibration_tokens(_CharTok(), cfg)
    assert toks.shape == (n, 32)
    src = toks[:, 0] - ord("a")                                   # 0, 1, 2: which text each row came from
    assert torch.equal(src, torch.arange(n) % k)                  # row i from source i mod k
    assert tuple(int((src == j).sum()) for j in range(k)) == counts
    assert bool((toks == toks[:, :1]).all())                      # each row from a single text


def test_single_source_unchanged_and_mix_seeds_per_source(tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(2000))           # distinct ids: offsets are visible
    (tmp_path / "t.txt").write_text(text)
    one = CalibConfig(str(tmp_path / "t.txt"), n_samples=6, seq_len=32, seed=3)
    g = torch.Generator().manual_seed(3)
    starts = torch.randint(0, 2000 - 32, (6,), generator=g)
    ref = torch.stack([torch.tensor([ord(c) for c in text[s:s + 32]]) for s in starts.tolist()])
    assert torch.equal(calibration_tokens(_CharTok(), one), ref)  # the single-source draw of before
    mix = calibration_tokens(_CharTok(), CalibConfig(f"{tmp_path / 't.txt'},{tmp_path / 't.txt'}", 6, 32, 3))
    assert torch.equal(mix[0::2], ref[:3])                        # source 0: seed 3, its first 3 windows
    assert not torch.equal(mix[1::2], ref[:3])                    # source 1: seed 4, other windows


def test_mix_needs_a_sample_per_source_and_names_between_commas(texts):
    with pytest.raises(ConfigError, match="mix of 3 sources needs at least that many samples"):
        CalibConfig(",".join(texts), n_samples=2, seq_len=128)
    with pytest.raises(ConfigError, match="empty name between commas"):
        calibration_sources("wikitext2-valid,,tinyshakespeare")


def test_file_with_a_comma_is_one_source(tmp_path):
    p = tmp_path / "a,b.txt"
    p.write_text("x" * 100)
    assert calibration_sources(str(p)) == (str(p),)
