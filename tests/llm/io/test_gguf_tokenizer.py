"""Tokenizers built from GGUF vocabularies of other families than SmolLM2's, against transformers' own
GGUF tokenizer conversion: byte-level BPEs split by the Llama-3, Qwen2 and Tekken regexes (SmolLM2's
real vocabulary and merges under each pre-tokenizer name), and a SentencePiece BPE (Llama-2 / Mistral
style: scores, byte fallback, "▁" spaces) trained here on WikiText-2. Token ids must be identical."""

from __future__ import annotations

import pytest

from efficientml.core.errors import UnsupportedError
from efficientml.data.paths import resolve

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

TRICKY = ("Hello world!  It's 2024: 12345 apples, 3.14159 pies.\n\n\tTabs\r\nand   spaces   "
          "DON'T we've I'M — naïve café 東京 🙂 x=y+1; foo_bar(baz) 1,000,000 <b>bold</b>  ")


@pytest.fixture(scope="module")
def text() -> str:
    return resolve("text/wikitext-2-raw-test.raw").read_text(encoding="utf-8")[:40_000] + TRICKY


def _pair(path):
    from efficientml.llm.io.gguf import GGUFFile
    from efficientml.llm.io.tokenizer import Tokenizer

    ours = Tokenizer.from_gguf(GGUFFile(path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return ours, theirs


@pytest.fixture(scope="module")
def smollm2_vocab():
    from efficientml.llm.io.gguf import GGUFFile
    from efficientml.llm.io.source import resolve_source

    try:
        gf = GGUFFile(resolve_source("smollm2-135m"))
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"needs the SmolLM2 GGUF ({e})")
    return (gf.field("tokenizer.ggml.tokens"), gf.field("tokenizer.ggml.merges"),
            gf.field("tokenizer.ggml.token_type"))


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "tekken", "gpt-2"])
def test_byte_level_pre_tokenizers_match_transformers(tmp_path, smollm2_vocab, text, pre, write_tokenizer_gguf):
    tokens, merges, types = smollm2_vocab
    path = tmp_path / f"{pre}.gguf"
    write_tokenizer_gguf(path, "gpt2", tokens, types, pre=pre, merges=merges)
    ours, theirs = _pair(path)
    a = ours.encode(text, add_bos=False)
    b = theirs(text, add_special_tokens=False).input_ids
    assert a == b
    assert ours.decode(a) == text
    # the splits differ: Llama-3 groups up to 3 digits, Qwen2 and Tekken split every digit, GPT-2 keeps them
    pieces = [p for p, _ in ours.backend.pre_tokenizer.pre_tokenize_str(" 12345")]
    each = ["\u0120", "1", "2", "3", "4", "5"]
    assert pieces == {"llama-bpe": ["\u0120", "123", "45"], "qwen2": each, "tekken": each,
                      "gpt-2": ["\u012012345"]}[pre]


def test_unknown_pre_tokenizer_is_refused(tmp_path, smollm2_vocab, write_tokenizer_gguf):
    from efficientml.llm.io.gguf import GGUFFile
    from efficientml.llm.io.tokenizer import Tokenizer

    tokens, merges, types = smollm2_vocab
    path = tmp_path / "odd.gguf"
    write_tokenizer_gguf(path, "gpt2", tokens, types, pre="some-new-model", merges=merges)
    with pytest.raises(UnsupportedError, match="pre-tokenizer 'some-new-model' is not known"):
        Tokenizer.from_gguf(GGUFFile(path))


@pytest.fixture(scope="module")
def spm_vocab(text):
    """A SentencePiece-style BPE vocabulary (Llama-2's layout: <unk> <s> </s>, 256 byte tokens, then
    pieces scored by merge order) trained on WikiText-2 with the tokenizers library."""
    tk = pytest.importorskip("tokenizers")
    train = resolve("text/wikitext-2-raw-test.raw").read_text(encoding="utf-8")[200_000:600_000]
    bpe = tk.Tokenizer(tk.models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = tk.pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = tk.trainers.BpeTrainer(vocab_size=3000, special_tokens=["<unk>", "<s>", "</s>"],
                                     initial_alphabet=[], limit_alphabet=200, show_progress=False)
    bpe.train_from_iterator([train], trainer)
    learned = sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])
    pieces = [t for t, _ in learned if t not in ("<unk>", "<s>", "</s>")]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


def test_sentencepiece_bpe_matches_transformers(tmp_path, spm_vocab, text, write_tokenizer_gguf):
    tokens, types, scores = spm_vocab
    path = tmp_path / "spm.gguf"
    write_tokenizer_gguf(path, "llama", tokens, types, scores=scores, bos=1, eos=2)
    ours, theirs = _pair(path)
    # transformers' GGUF conversion adds the "▁" prefix only where the text does not start with a space
    # (Metaspace "first"); llama.cpp and SentencePiece always add it (" =" → "▁▁="; the sentencepiece
    # library is the reference in test_sentencepiece_model.py). Compared here where the two agree.
    t = text.lstrip(" ")
    a = ours.encode(t)
    b = theirs(t).input_ids
    assert a[0] == 1 and ours.add_bos  # SentencePiece models add <s> by default
    assert a == b
    assert ours.decode(a) == theirs.decode(b)
    assert ours.decode(a, skip_special_tokens=True) == t  # byte fallback: 東京 🙂 come back exactly
    assert ours.backend.normalizer.normalize_str(" = R") == "\u2581\u2581=\u2581R"  # llama.cpp's prefix
    assert any(tokens[i].startswith("<0x") for i in a)
    a = ours.encode(text)
    assert ours.decode(ours.encode("Hello world", add_bos=False)) == "Hello world"
    assert tokens[ours.encode("Hello", add_bos=False)[0]].startswith("\u2581")  # "▁" space prefix
    out = tmp_path / "hf"  # as save_hf writes it: transformers reads the same tokenizer back
    out.mkdir()
    ours.save(out)
    assert transformers.AutoTokenizer.from_pretrained(str(out))(text).input_ids == a
    from efficientml.llm.io.tokenizer import Tokenizer

    assert Tokenizer.from_folder(out).encode(text) == a  # BOS once, not twice


def test_spm_merges_rank_by_score():
    from efficientml.llm.io.tokenizer import spm_merges

    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    scores = [0, 0, 0, -2.0, -1.0, -3.0]
    assert spm_merges(tokens, scores) == [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]
