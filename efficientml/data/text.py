"""Text corpora for language-model evaluation and tiny training runs.

``load_text(name_or_path)`` returns a whole corpus as one string:

- ``"wikitext2-raw-test"``: WikiText-2 raw test split (CC BY-SA 3.0). The shared copy has LF line
  endings and no blank lines between paragraphs, so it is close to but not byte-identical with the
  canonical file; there is no public URL for exactly this file, so it is never downloaded.
- ``"wikitext2-test"``, ``"wikitext2-valid"``: WikiText-2 v1 tokenized splits (with ``<unk>``).
- ``"tinyshakespeare"``: 1,115,394 characters of Shakespeare, as distributed with char-rnn;
  ``"tinyshakespeare-train"`` / ``"tinyshakespeare-val"`` are its first 90 % and last 10 % of characters
  (the split of :func:`tinyshakespeare_chars`), so text calibrated on one is never evaluated on the other.

:class:`CharDataset` cuts a text into (x, y) blocks of character ids, y shifted by one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from efficientml.core.config import check_choice, check_range
from efficientml.core.errors import ConfigError, DataNotFoundError
from efficientml.data import paths


@dataclass(frozen=True)
class TextSource:
    relpath: str            # under a data root, e.g. "text/tinyshakespeare.txt"
    sha256: str
    url: str | None         # canonical public copy with the same bytes, if one exists


_PYTORCH_EXAMPLES = "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/"
TEXTS: dict[str, TextSource] = {
    "wikitext2-raw-test": TextSource(
        "text/wikitext-2-raw-test.raw",
        "bbf94c53a05abe9ee670d3b6343608095822c85e26de37c70b24fc571964574a", None),
    "wikitext2-test": TextSource(
        "text/wikitext-2-test.tokens",
        "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0", _PYTORCH_EXAMPLES + "test.txt"),
    "wikitext2-valid": TextSource(
        "text/wikitext-2-valid.tokens",
        "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8", _PYTORCH_EXAMPLES + "valid.txt"),
    "tinyshakespeare": TextSource(
        "text/tinyshakespeare.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"),
}


# named character splits of a corpus: (corpus, start fraction, end fraction)
SPLITS: dict[str, tuple[str, float, float]] = {
    "tinyshakespeare-train": ("tinyshakespeare", 0.0, 0.9),
    "tinyshakespeare-val": ("tinyshakespeare", 0.9, 1.0),
}


_NAMES = ", ".join([*TEXTS, *SPLITS])


def known_text(name: str) -> bool:
    """Whether ``name`` is a corpus or split name (not a file path)."""
    return _canonical(name) in TEXTS or _canonical(name) in SPLITS


def text_path(name: str, explicit: str | os.PathLike | None = None) -> Path:
    """Where the named corpus is (found locally, or downloaded and checked by sha256)."""
    src = TEXTS.get(_canonical(name))
    if src is None:
        raise ConfigError(f"unknown text corpus {name!r}; expected one of {_NAMES} or a file path")
    return paths.resolve(src.relpath, explicit=explicit, url=src.url, sha256=src.sha256)


def load_text(name_or_path: str | os.PathLike) -> str:
    """The corpus named ``name_or_path`` (see :data:`TEXTS`, :data:`SPLITS`), or the UTF-8 file at that path."""
    if isinstance(name_or_path, str) and _canonical(name_or_path) in SPLITS:
        corpus, lo, hi = SPLITS[_canonical(name_or_path)]
        text = load_text(corpus)
        return text[int(len(text) * lo):int(len(text) * hi)]  # the cut of tinyshakespeare_chars
    if isinstance(name_or_path, str) and _canonical(name_or_path) in TEXTS:
        path = text_path(name_or_path)
    else:
        path = Path(name_or_path)
        if not path.exists():
            raise DataNotFoundError(
                f"{str(name_or_path)!r} is neither a known corpus ({_NAMES}) nor an existing file")
        from efficientml.core.paths import require_file

        require_file(path, "text file", DataNotFoundError)
    return decode_text(path.read_bytes(), f"text file {str(path)!r}")


def decode_text(data: bytes, where: str = "the text") -> str:
    """UTF-8 (a BOM is dropped), or UTF-16 when it starts with a UTF-16 byte-order mark; anything else
    is one ConfigError naming the first bad byte. Line endings are kept as they are."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{where} starts as UTF-16 but is not valid UTF-16 at byte {e.start}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                          "convert it to UTF-8") from None


def _canonical(name: str) -> str:
    return name.lower().replace("wikitext-2", "wikitext2").replace("_", "-").replace("tiny-shakespeare",
                                                                                     "tinyshakespeare")


class CharDataset(Dataset):
    """(x, y) pairs of ``block_size`` character ids from ``text``; y is x shifted one to the right.

    Blocks start every ``stride`` characters (default ``block_size``: non-overlapping). The vocabulary
    is the sorted set of characters unless given (pass the training set's to a validation set).
    """

    def __init__(self, text: str, block_size: int = 128, stride: int | None = None,
                 vocab: list[str] | None = None):
        if block_size < 1:
            raise ConfigError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self.stride = block_size if stride is None else stride
        if self.stride < 1:
            raise ConfigError(f"stride must be at least 1, got {self.stride}")
        self.vocab = sorted(set(text)) if vocab is None else list(vocab)
        self.stoi = {c: i for i, c in enumerate(self.vocab)}
        unknown = set(text) - self.stoi.keys()
        if unknown:
            raise ConfigError(f"text has {len(unknown)} character(s) outside the vocabulary, e.g. "
                              f"{sorted(unknown)[0]!r}")
        self.data = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        if len(self.data) < block_size + 1:
            raise ConfigError(f"text of {len(self.data)} characters is too short for block_size {block_size}")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, s: str) -> torch.Tensor:
        return torch.tensor([self.stoi[c] for c in s], dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    def __len__(self) -> int:
        return (len(self.data) - 1 - self.block_size) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"block {i} out of range for {len(self)} blocks")
        start = (i % len(self)) * self.stride
        chunk = self.data[start:start + self.block_size + 1]
        return chunk[:-1], chunk[1:]              # (block_size,), (block_size,)


def tinyshakespeare_chars(split: str = "train", block_size: int = 128, train_fraction: float = 0.9,
                          stride: int | None = None) -> CharDataset:
    """Character-level TinyShakespeare: the first ``train_fraction`` is "train", the rest "val".

    Both splits share the 65-character vocabulary of the whole text.
    """
    check_choice("split", split, {"train", "val"})
    check_range("train_fraction", train_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
    text = load_text("tinyshakespeare")
    cut = int(len(text) * train_fraction)
    part = text[:cut] if split == "train" else text[cut:]
    return CharDataset(part, block_size, stride, vocab=sorted(set(text)))
