"""Writing GGUF files: what we write reads back through our loader exactly, through transformers' GGUF
loader (the gguf package's decoders, its own Q/K un-permutation) to the same tensors, and through
transformers' GGUF tokenizer conversion to the same token ids; what cannot be written is refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from efficientml import apply
from efficientml.core.errors import CheckpointError, ConfigError, UnsupportedError
from efficientml.data.paths import resolve
from efficientml.llm.config import LlamaConfig
from efficientml.llm.io.gguf import GGUFFile
from efficientml.llm.io.ggml_encode import quantize_q4_0, quantize_q4_1, quantize_q8_0
from efficientml.llm.io.gguf import permute_rope_rows
from efficientml.llm.io.gguf_write import gguf_name, save_gguf
from efficientml.llm.io.load import load, load_gguf
from efficientml.llm.model import build_model, init_weights
from efficientml.llm.io.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

Q8_BOUND = 0.5 + 127 * 2.0 ** -11  # Q8_0 error in steps d = max|w|/127: half a step + the fp16 rounding of d
TINY = LlamaConfig(vocab_size=640, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def text() -> str:
    return resolve("text/wikitext-2-raw-test.raw").read_text(encoding="utf-8")[:30_000] + \
        "It's 2024: 12345 apples — naïve café 東京 🙂 <|im_start|>user\nhi<|im_end|>"


@pytest.fixture(scope="module")
def small_tok(text):
    """A byte-level BPE (GPT-2 split) of ~600 tokens trained here: small enough that files read fast."""
    tk = pytest.importorskip("tokenizers")
    bpe = tk.Tokenizer(tk.models.BPE())
    bpe.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=600,
                                     special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([text], trainer)
    return Tokenizer(bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                     chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")


def tiny(cfg: LlamaConfig = TINY, seed: int = 0):
    m = build_model(cfg, device="cpu")
    init_weights(m, std=0.2, seed=seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.copy_(1 + 0.1 * torch.randn(p.shape) if n.endswith("weight") else 0.1 * torch.randn(p.shape))
    return m.eval()


def transformers_tensors(path, cls=None, cfg_cls=None):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf_cfg = {k: v for k, v in load_gguf_checkpoint(str(path))["config"].items() if k != "model_type"}
    hf = (cls or transformers.LlamaForCausalLM)((cfg_cls or transformers.LlamaConfig)(**hf_cfg))
    out = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf)["tensors"]
    return {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in out.items()}


def test_smollm2_f32_reads_back_exactly_and_tokenizes_alike_in_transformers(smollm2, tmp_path, text):
    """The real model: every tensor and the configuration back exactly; transformers' tokenizer from
    our file gives our ids (its tensors are checked on the small models below)."""
    model, tok = smollm2
    path = save_gguf(model, tok, tmp_path / "smollm2.gguf", outtype="f32")
    again, tok2 = load(path)
    assert again.config == model.config
    sd, sd2 = model.state_dict(), again.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert tok2.encode(text) == tok.encode(text) and tok2.chat_template == tok.chat_template
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert hf_tok(text, add_special_tokens=False).input_ids == tok.encode(text)
    meta = GGUFFile(path).meta
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["general.architecture"] == "llama"
    with pytest.raises(CheckpointError, match="exists"):
        save_gguf(model, tok, path)


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_outtypes_store_what_they_say(small_tok, tmp_path, outtype, text):
    """Matrices in the chosen type (norms f32; embeddings Q8_0 under the 4-bit types), Q/K rows in
    llama.cpp's order; our reader and transformers' read exactly the cast / reference-quantized
    values of the source weights."""
    m = tiny(dataclasses.replace(TINY, eos_token_id=[2, 1, 0]))  # EOS, end of turn, end of message
    path = save_gguf(m, small_tok, tmp_path / f"t-{outtype}.gguf", outtype=outtype)
    assert Tokenizer.from_gguf(GGUFFile(path)).encode(text) == small_tok.encode(text)
    assert GGUFFile(path).config.eos_token_ids == [2, 1, 0]
    reader = gguf.GGUFReader(str(path))
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"].name == "F32" and kinds["blk.0.ffn_down.weight"].name == outtype.upper()
    assert kinds["token_embd.weight"].name == ("Q8_0" if outtype.startswith("q4") else outtype.upper())
    from efficientml.llm.io.load import checkpoint_dtype  # dtype="auto": a float file's type, else float32

    assert checkpoint_dtype(path) == {"f16": torch.float16, "bf16": torch.bfloat16}.get(outtype, torch.float32)
    q = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    q_rows = torch.as_tensor(np.asarray(gguf.quants.dequantize(q.data, q.tensor_type)), dtype=torch.float32)
    ours = load_gguf(GGUFFile(path)).state_dict()
    theirs = transformers_tensors(path)
    for k, w in m.state_dict().items():
        assert torch.equal(ours[k], theirs[k]), k
        kind = kinds[gguf_name(k)]
        if kind.name in ("F32", "F16", "BF16"):
            want = w.to({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[kind.name]).float()
        else:  # blocks lie within rows, so quantizing before or after the Q/K row permutation is the same
            want = torch.as_tensor(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), kind), kind))
        assert torch.equal(ours[k], want.reshape(w.shape)), k
    q_ref = permute_rope_rows(ours["model.layers.1.self_attn.q_proj.weight"], TINY.num_attention_heads)
    assert torch.equal(q_rows.reshape(q_ref.shape), q_ref)  # stored in llama.cpp's row order


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_block_encoders_equal_the_ggml_reference(kind):
    """Our encoders give the bytes of ggml's reference quantizers (as the gguf package implements
    them), zero and constant blocks and rounding ties included; Q8_0 stays within its error bound."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.logspace(-4, 2, 64)[:, None]
    w[5] = 0
    w[6, :32] = 0.5
    w[7, :16] = -2.0
    t = getattr(gguf.GGMLQuantizationType, kind)
    ours = {"Q8_0": quantize_q8_0, "Q4_0": quantize_q4_0, "Q4_1": quantize_q4_1}[kind](w)
    assert np.array_equal(ours, gguf.quants.quantize(w.numpy(), t).reshape(-1))
    back = torch.as_tensor(gguf.quants.dequantize(ours, t).reshape(w.shape))
    assert torch.equal(back[5], torch.zeros(256))
    if kind == "Q8_0":  # where the fp16 scale is a normal number (tiny scales lose bits as subnormals)
        step = w.reshape(-1, 32).abs().amax(1, keepdim=True) / 127
        err = ((back - w).reshape(-1, 32).abs() / step.clamp(min=1e-30))[step[:, 0] >= 2.0 ** -14]
        assert float(err.max()) <= Q8_BOUND and float(err.max()) > 0.45


def test_smollm2_written_as_q4_1_is_llamacpps_file_tensor_for_tensor(smollm2, tmp_path):
    """SmolLM2's GGUF (written by llama.cpp: Q4_1 blocks, a Q8_0 embedding), loaded to fp32 and written
    back as q4_1: every one of its 272 tensors has the original file's type and bytes."""
    from efficientml.llm.io.source import resolve_source

    path = save_gguf(smollm2[0], smollm2[1], tmp_path / "q4_1.gguf", outtype="q4_1")
    orig = {t.name: t for t in GGUFFile(resolve_source("smollm2-135m")).infos}
    ours = {t.name: t for t in GGUFFile(path).infos}
    assert set(ours) == set(orig) and len(ours) == 272
    for name, t in orig.items():
        assert ours[name].kind == t.kind and np.array_equal(ours[name].data, t.data), name


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama3-rope", "linear-rope"])
def test_other_families_read_back_exactly(small_tok, tmp_path, kind):
    cfg = {"qwen2": dataclasses.replace(TINY, model_type="qwen2", attention_bias=True, tie_word_embeddings=True),
           "qwen3": dataclasses.replace(TINY, model_type="qwen3", qk_norm=True, head_dim=32),
           "llama3-rope": dataclasses.replace(TINY, rope_theta=500000.0, rope_scaling={
               "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}),
           "linear-rope": dataclasses.replace(TINY, rope_scaling={"rope_type": "linear", "factor": 2.0})}[kind]
    m = tiny(cfg)
    path = save_gguf(m, small_tok, tmp_path / f"{kind}.gguf", outtype="f32")
    back = load_gguf(GGUFFile(path))
    assert back.config.rope_scaling == cfg.rope_scaling and back.config.model_type == cfg.model_type
    assert (back.config.attention_bias, back.config.qk_norm, back.config.dim_per_head) == \
        (cfg.attention_bias, cfg.qk_norm, cfg.dim_per_head)
    sd = back.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    ids = torch.tensor([[5, 17, 300, 599, 12]])
    with torch.no_grad():
        assert torch.equal(back(ids), m(ids))
    if kind == "qwen2":  # no Q/K permutation for qwen: transformers reads the same tensors
        theirs = transformers_tensors(path, transformers.Qwen2ForCausalLM, transformers.Qwen2Config)
        assert all(torch.equal(sd[k], v) for k, v in theirs.items())
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
        ids = small_tok.encode("It's 2024: naïve café 東京 🙂")
        assert hf_tok("It's 2024: naïve café 東京 🙂", add_special_tokens=False).input_ids == ids


def test_sentencepiece_tokenizer_from_gguf_is_written_back(tmp_path, text, write_tokenizer_gguf):
    """A Llama-2-style SentencePiece vocabulary (scores, byte tokens): ours and transformers' tokenizers
    from the file we write give the ids the original gives."""
    tk = pytest.importorskip("tokenizers")
    bpe = tk.Tokenizer(tk.models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = tk.pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = tk.trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    bpe.train_from_iterator([text[:20_000]], trainer)
    learned = sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])
    pieces = [t for t, _ in learned if t not in ("<unk>", "<s>", "</s>")]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    src = tmp_path / "spm.gguf"
    write_tokenizer_gguf(src, "llama", tokens, types, scores=scores, bos=1, eos=2)
    tok = Tokenizer.from_gguf(GGUFFile(src))
    m = tiny(dataclasses.replace(TINY, vocab_size=len(tokens) + 5))  # padded vocabulary: [PAD] tokens
    out = save_gguf(m, tok, tmp_path / "out" / "spm-model.gguf")
    back = Tokenizer.from_gguf(GGUFFile(out))
    want = tok.encode(text)
    assert back.encode(text) == want and back.add_bos
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    t = text.lstrip(" ")  # where transformers' GGUF conversion and llama.cpp agree (test_gguf_tokenizer.py)
    assert hf_tok(t).input_ids == tok.encode(t)
    meta = GGUFFile(out).meta
    assert meta["tokenizer.ggml.token_type"][-5:] == [5] * 5 and meta["tokenizer.ggml.token_type"][3] == 6
    hf_folder = tmp_path / "hf"  # a SentencePiece tokenizer read from tokenizer.json has no scores
    hf_folder.mkdir()
    tok.save(hf_folder)
    with pytest.raises(UnsupportedError, match="scores"):
        save_gguf(m, Tokenizer.from_folder(hf_folder), tmp_path / "x.gguf")


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_linears_are_written_exactly(small_tok, tmp_path, bits):
    """RTN/AWQ/GPTQ weights on a symmetric grid with groups of 32 go into Q4_0 / Q8_0 unchanged: the
    file's weights (read by us and by transformers) are exactly the QuantLinears' dequantized weights."""
    from efficientml.llm.compress import QuantLinear, RTNConfig

    m = tiny()
    apply(m, RTNConfig(w_bits=bits, group_size=32, symmetric=True), inplace=True)
    path = save_gguf(m, small_tok, tmp_path / "q.gguf", outtype="f32")
    kinds = {t.name: t.kind for t in GGUFFile(path).infos}
    assert kinds["blk.1.attn_q.weight"] == kinds["blk.0.ffn_down.weight"] == ("Q4_0" if bits == 4 else "Q8_0")
    assert kinds["token_embd.weight"] == "F32"  # not quantized by RTN: written as outtype says
    back = load_gguf(GGUFFile(path))
    theirs = transformers_tensors(path)
    quantized = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, QuantLinear)]
    assert len(quantized) == 7 * TINY.num_hidden_layers
    for name, mod in quantized:
        assert torch.equal(back.get_submodule(name).weight, mod.dequantize()), name
        assert torch.equal(theirs[f"{name}.weight"], mod.dequantize()), name
    ids = torch.tensor([[5, 17, 300, 599, 12]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids), m(ids), rtol=1e-5, atol=1e-5)


def test_what_cannot_be_written_is_refused(small_tok, tmp_path):
    tok = small_tok
    for cfg, match in ((dataclasses.replace(TINY, sliding_window=8), "sliding-window"),
                       (dataclasses.replace(TINY, position_embedding="alibi"), "ALiBi"),
                       (dataclasses.replace(TINY, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
                        "dynamic")):
        with pytest.raises(UnsupportedError, match=match):
            save_gguf(tiny(cfg), tok, tmp_path / "x.gguf")
    m = tiny()
    with pytest.raises(ConfigError, match="outtype"):
        save_gguf(m, tok, tmp_path / "x.gguf", outtype="q4_k")
    with pytest.raises(ConfigError, match="tokenizer"):
        save_gguf(m, None, tmp_path / "x.gguf")
    from efficientml.llm.compress import RTNConfig  # not silently re-quantized to another grid

    for spec in (dict(w_bits=4, group_size=32), dict(w_bits=4, group_size=None, symmetric=True),
                 dict(w_bits=3, group_size=32, symmetric=True)):
        q = tiny()
        apply(q, RTNConfig(**spec), inplace=True)
        with pytest.raises(UnsupportedError, match="GGUF holds exactly only symmetric 4-bit"):
            save_gguf(q, tok, tmp_path / "x.gguf")
    q = tiny()
    q.model.layers[0].mlp.down_proj = torch.nn.Sequential(q.model.layers[0].mlp.down_proj)
    with pytest.raises(UnsupportedError, match="not part of a plain Llama model"):
        save_gguf(q, tok, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf*"))  # nothing half-written


def test_sampling_defaults_as_llama_cpp_writes_them(small_tok, tmp_path):
    """general.sampling.*: top-k int32, the rest float32 (gguf-py's reader sees those types); read
    back by generation_defaults as written."""
    from efficientml.llm.io.generation_config import generation_defaults

    want = {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05}
    path = save_gguf(tiny(), small_tok, tmp_path / "s.gguf", outtype="f32", sampling=want)
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["general.sampling.top_k"].types == [gguf.GGUFValueType.INT32]
    assert fields["general.sampling.temp"].types == [gguf.GGUFValueType.FLOAT32]
    got = generation_defaults(path)
    assert got.keys() == want.keys() and got["top_k"] == 20
    assert all(abs(got[k] - v) < 1e-6 for k, v in want.items())
    assert generation_defaults(save_gguf(tiny(), small_tok, tmp_path / "none.gguf", outtype="f32")) == {}
    with pytest.raises(ConfigError, match="no GGUF key"):
        save_gguf(tiny(), small_tok, tmp_path / "bad.gguf", sampling={"typical_p": 0.9})
    assert not (tmp_path / "bad.gguf").exists()


@pytest.mark.parametrize("options", [
    {"sliding_window": 7},
    {"partial_rotary_factor": 0.5, "max_position_embeddings": 64,
     "rope_scaling": {"rope_type": "longrope", "original_max_position_embeddings": 16,
                      "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.5, 2.5, 4.0, 8.0]}},
])
def test_phi3_written_as_llama_cpp_lays_it_out(small_tok, tmp_path, options):
    """Phi-3 → llama.cpp's phi3: fused attn_qkv / ffn_up (rotate-half rows kept), rope.dimension_count =
    the rotary part, the window, LongRoPE factors as tensors with the pretrained context and attention
    factor. Read back (the reader matches transformers on llama.cpp's own layout, test_phi3.py), the
    model is the same, past the LongRoPE switch too."""
    cfg = dataclasses.replace(TINY, model_type="phi3", **options)
    m = tiny(cfg)
    path = save_gguf(m, small_tok, tmp_path / "phi3.gguf", outtype="f32")
    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_qkv.weight", "blk.1.ffn_up.weight"} <= names
    assert not {"blk.0.attn_q.weight", "blk.0.ffn_gate.weight"} & names
    assert reader.fields["phi3.rope.dimension_count"].parts[-1][0] == cfg.rotary_dim
    back = load_gguf(GGUFFile(path))
    assert back.config.sliding_window == cfg.sliding_window and back.config.rotary_dim == cfg.rotary_dim
    ids = torch.randint(0, 640, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(back(ids), m(ids), rtol=0, atol=1e-5)
