"""A folder with only a SentencePiece tokenizer.model (older Llama-2-style repos): our protobuf reader
and BPE give the same ids and text as the sentencepiece library itself, on models it trains here on
WikiText-2 (Llama's settings, and sentencepiece's defaults: NFKC, whitespace folding, no byte fallback)."""

from __future__ import annotations

import json

import pytest

from efficientml.core.errors import CheckpointError, UnsupportedError
from efficientml.data.paths import resolve
from efficientml.llm.io.sentencepiece_model import read_sentencepiece_model
from efficientml.llm.io.tokenizer import Tokenizer

spm = pytest.importorskip("sentencepiece")

TRICKY = ["Hello world", "  two leading spaces", "trailing  ", "a  b   c", "12345 + 678 = 13023",
          "naïve café 東京 🙂 ｆｕｌｌｗｉｄｔｈ", "line one\nline two\n\n", "\t tab", "", " "]


@pytest.fixture(scope="module")
def text() -> str:
    return resolve("text/wikitext-2-raw-test.raw").read_text(encoding="utf-8")[:60_000]


def _train(tmp_path_factory, text: str, name: str, **kw) -> tuple[object, object]:
    d = tmp_path_factory.mktemp(name)
    (d / "train.txt").write_text(text, encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(d / "train.txt"), model_prefix=str(d / "tokenizer"), vocab_size=700,
                                   character_coverage=0.9995, num_threads=1, minloglevel=2, **kw)
    return d, spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))


@pytest.fixture(scope="module")
def llama_like(tmp_path_factory, text):
    """Llama-2's settings: BPE, byte fallback, identity normalization, spaces kept, digits split."""
    return _train(tmp_path_factory, text, "llama", model_type="bpe", byte_fallback=True, split_digits=True,
                  normalization_rule_name="identity", remove_extra_whitespaces=False)


@pytest.fixture(scope="module")
def defaults(tmp_path_factory, text):
    """sentencepiece's own defaults for BPE: NFKC (a precompiled charsmap), whitespace folding, no byte fallback."""
    return _train(tmp_path_factory, text, "nfkc", model_type="bpe")


def _check(folder, sp, text):
    tok = Tokenizer.from_folder(folder)
    samples = TRICKY + text.splitlines()[:300] + [text[:5000]]
    for s in samples:
        want = sp.encode(s)
        assert tok.encode(s, add_bos=False) == want, repr(s)
        # sentencepiece shows an unknown piece as " ⁇ ", transformers (and we) as the unk token
        assert tok.decode(want).replace("<unk>", " \u2047 ") == sp.decode(want), repr(s)
    return tok


def test_llama_like_model_matches_sentencepiece(llama_like, text):
    folder, sp = llama_like
    m = read_sentencepiece_model(folder / "tokenizer.model")
    assert m.model_type == "bpe" and m.byte_fallback and not m.remove_extra_whitespaces
    assert len(m.pieces) == sp.get_piece_size() == 700
    assert m.pieces == [sp.id_to_piece(i) for i in range(700)]
    assert m.scores == pytest.approx([sp.get_score(i) for i in range(700)])
    assert (m.unk_id, m.bos_id, m.eos_id, m.pad_id) == (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id())
    tok = _check(folder, sp, text)
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.add_bos  # LlamaTokenizer's default
    assert tok.encode("Hi")[0] == sp.bos_id()
    # special tokens in the text are tokens (sentencepiece itself has no such notion), and the text after
    # one gets the dummy prefix again, as in llama.cpp and transformers' legacy Llama tokenizer
    assert tok.encode("a</s>b", add_bos=False) == sp.encode("a") + [sp.eos_id()] + sp.encode("b")


def test_default_normalization_matches_sentencepiece(defaults, text):
    folder, sp = defaults
    m = read_sentencepiece_model(folder / "tokenizer.model")
    assert m.precompiled_charsmap and m.remove_extra_whitespaces and not m.byte_fallback
    _check(folder, sp, text)


def test_tokenizer_config_and_added_tokens(llama_like, tmp_path):
    folder, sp = llama_like
    d = tmp_path / "m"
    d.mkdir()
    (d / "tokenizer.model").write_bytes((folder / "tokenizer.model").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "eos_token": {"content": "<|end|>"},
        "chat_template": "{{ messages[0]['content'] }}",
        "added_tokens_decoder": {"0": {"content": "<unk>", "special": True},
                                 "700": {"content": "<|end|>", "special": True}}}))
    tok = Tokenizer.from_folder(d)
    assert tok.eos_id == 700 and not tok.add_bos and tok.encode("x<|end|>")[-1] == 700
    assert tok.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey"
    (d / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"702": {"content": "<x>"}}}))
    with pytest.raises(CheckpointError, match="adds token 702.*ends at 699"):
        Tokenizer.from_folder(d)
    (d / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"x": {"content": "<x>"}}}))
    with pytest.raises(CheckpointError, match="added_tokens_decoder must map token ids"):
        Tokenizer.from_folder(d)


def test_refusals(tmp_path_factory, text, llama_like, tmp_path):
    folder, _ = _train(tmp_path_factory, text, "unigram", model_type="unigram")
    with pytest.raises(UnsupportedError, match="SentencePiece unigram model"):
        Tokenizer.from_folder(folder)
    good = (llama_like[0] / "tokenizer.model").read_bytes()
    (tmp_path / "tokenizer.model").write_bytes(good[: len(good) // 3])
    with pytest.raises(CheckpointError, match="truncated or not a SentencePiece model"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a SentencePiece model"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_written_to_gguf_as_llama_cpp_reads_it(llama_like, defaults, tmp_path, text):
    """The SentencePiece vocabulary and scores go into a GGUF "llama" tokenizer that reads back the same;
    a normalizing one is refused (llama.cpp would not normalize)."""
    from efficientml.llm.config import LlamaConfig
    from efficientml.llm.io.gguf import GGUFFile
    from efficientml.llm.io.gguf_write import save_gguf
    from efficientml.llm.model import build_model, init_weights

    cfg = LlamaConfig(vocab_size=704, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = build_model(cfg, device="cpu")
    init_weights(m, seed=0)
    tok = Tokenizer.from_folder(llama_like[0])
    back = Tokenizer.from_gguf(GGUFFile(save_gguf(m, tok, tmp_path / "t.gguf", outtype="f32")))
    for s in TRICKY + text.splitlines()[:100]:
        assert back.encode(s) == tok.encode(s), repr(s)
    with pytest.raises(UnsupportedError, match="normalizes text"):
        save_gguf(m, Tokenizer.from_folder(defaults[0]), tmp_path / "n.gguf", outtype="f32")


def test_gguf_sentencepiece_vocabulary_matches_sentencepiece(llama_like, text, tmp_path, write_tokenizer_gguf):
    """A GGUF "llama" tokenizer holding the same pieces, scores and types (as llama.cpp's converter writes
    them from tokenizer.model) tokenizes as sentencepiece does, leading spaces included."""
    from efficientml.llm.io.gguf import GGUFFile

    folder, sp = llama_like
    m = read_sentencepiece_model(folder / "tokenizer.model")
    write_tokenizer_gguf(tmp_path / "spm.gguf", "llama", m.pieces, m.types, scores=m.scores, bos=1, eos=2)
    tok = Tokenizer.from_gguf(GGUFFile(tmp_path / "spm.gguf"))
    for s in TRICKY + text.splitlines()[:300] + [text[:5000]]:
        assert tok.encode(s, add_bos=False) == sp.encode(s), repr(s)


def test_an_older_hub_repo_end_to_end(llama_like, tmp_path, monkeypatch, capsys):
    """A Llama-2-era repo in the Hub cache — pytorch_model.bin, tokenizer.model only, a generation config
    with a repetition penalty — run by `efficientml llm generate owner/name` offline."""
    import torch

    from efficientml.cli.main import main
    from efficientml.llm.config import LlamaConfig
    from efficientml.llm.model import build_model, init_weights

    folder, sp = llama_like
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--old-org--llama-2-style"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    cfg = LlamaConfig(vocab_size=700, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    m = build_model(cfg, device="cpu")
    init_weights(m, seed=0)
    (snap / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    torch.save(m.state_dict(), snap / "pytorch_model.bin")
    (snap / "tokenizer.model").write_bytes((folder / "tokenizer.model").read_bytes())
    (snap / "generation_config.json").write_text(json.dumps({"do_sample": False, "repetition_penalty": 1.1}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["llm", "generate", "old-org/llama-2-style", "Robert Boulter is", "--max-new-tokens", "4",
                 "--json"]) == 0
    out, err = capsys.readouterr()
    res = json.loads(out)
    assert res["prompt_tokens"] == len(sp.encode("Robert Boulter is")) + 1  # <s> added, as LlamaTokenizer does
    assert res["new_tokens"] == 4 and "repetition_penalty=1.1" in err
