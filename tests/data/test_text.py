import pytest
import torch

from efficientml.core.errors import ConfigError, DataNotFoundError
from efficientml.data.text import CharDataset, load_text, tinyshakespeare_chars


@pytest.mark.parametrize("name,chars,words", [("tinyshakespeare", 1_115_394, 202_651),
                                              ("wikitext2-raw-test", 1_285_622, 241_211),
                                              ("wikitext2-test", 1_255_018, 241_211),
                                              ("wikitext-2-valid", 1_120_192, 213_886)])
def test_corpus_lengths(name, chars, words):
    text = load_text(name)
    assert len(text) == chars
    assert len(text.split()) == words


def test_load_from_path_and_unknown(tmp_path):
    (tmp_path / "a.txt").write_text("hello\r\nworld", encoding="utf-8", newline="")
    assert load_text(tmp_path / "a.txt") == "hello\r\nworld"
    with pytest.raises(DataNotFoundError, match="neither a known corpus"):
        load_text("penn-treebank")


def test_char_dataset_blocks():
    ds = CharDataset("abcdefghij", block_size=3)
    assert len(ds) == 3 and ds.vocab_size == 10
    x, y = ds[1]
    assert ds.decode(x) == "def" and ds.decode(y) == "efg"
    assert ds.decode(ds[-1][1]) == "hij"
    assert len(CharDataset("abcdefghij", block_size=3, stride=1)) == 7
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(ConfigError, match="too short"):
        CharDataset("ab", block_size=3)


def test_tinyshakespeare_chars():
    train = tinyshakespeare_chars("train", block_size=256)
    val = tinyshakespeare_chars("val", block_size=256)
    assert train.vocab_size == val.vocab_size == 65
    assert len(train.data) == 1_003_854 and len(val.data) == 111_540
    assert len(train) == (1_003_854 - 1) // 256
    x, y = train[0]
    assert x.shape == y.shape == (256,) and x.dtype == torch.long
    assert train.decode(x).startswith("First Citizen:")
    assert torch.equal(x[1:], y[:-1])


def test_tinyshakespeare_splits_are_the_char_dataset_cut():
    full, train, val = (load_text(n) for n in ("tinyshakespeare", "tinyshakespeare-train", "tinyshakespeare-val"))
    assert (len(train), len(val)) == (1_003_854, 111_540) and train + val == full
    assert tinyshakespeare_chars("val", block_size=8).decode(tinyshakespeare_chars("val", block_size=8).data) == val
