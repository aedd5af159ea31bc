"""Granite (IBM Granite 3.x): Llama blocks with an embedding multiplier, an attention multiplier in place of
1/sqrt(head dim), residual-branch multipliers and logits divided by a scale — logits, perplexity scoring and
greedy generations equal to transformers' GraniteForCausalLM on the same (random) weights; saved folders and
compressed checkpoints load back in transformers."""

from __future__ import annotations

import json

import pytest
import torch

from efficientml.core.errors import UnsupportedError
from efficientml.llm.eval import nll_from_hidden
from efficientml.llm.generate import SamplingConfig, generate
from efficientml.llm.io.load import load_hf, save_hf

transformers = pytest.importorskip("transformers")

SCALARS = dict(embedding_multiplier=12.0, attention_multiplier=0.0625, residual_multiplier=0.22, logits_scaling=8.0)
BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            rms_norm_eps=1e-5, tie_word_embeddings=True, **SCALARS)


@pytest.fixture()
def pair(tmp_path):
    torch.manual_seed(0)
    theirs = transformers.GraniteForCausalLM(transformers.GraniteConfig(**BASE)).eval()
    theirs.save_pretrained(str(tmp_path / "hf"))
    return theirs, load_hf(tmp_path / "hf")


def test_logits_and_generation_match_transformers(pair):
    theirs, ours = pair
    assert {k: getattr(ours.config, k) for k in SCALARS} == SCALARS
    ids = torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = theirs(ids).logits
        assert ((ours(ids) - want).abs().max() / want.abs().max()).item() <= 1e-4
        labels = ids.clone()  # perplexity scores through the same logits (÷ logits_scaling)
        nll, n = nll_from_hidden(ours, ours.model(ids[:, :-1]), labels[:, 1:])
        ce = torch.nn.functional.cross_entropy(want[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1),
                                               reduction="sum")
        assert n == 38 and abs(nll - ce.item()) <= 1e-3 * ce.item()
    prompt = ids[:1, :8]
    expect = theirs.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)[0, 8:].tolist()
    assert generate(ours, prompt[0].tolist(), SamplingConfig(max_new_tokens=10)).tokens[0] == expect


def test_saved_folder_and_checkpoint_load_in_transformers(pair, tmp_path):
    theirs, ours = pair
    out = save_hf(ours, None, tmp_path / "ours")
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_type"] == "granite" and {k: conf[k] for k in SCALARS} == SCALARS
    back = transformers.GraniteForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(3, 96, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, theirs(ids).logits)


def test_refused_where_it_has_no_form():
    from efficientml.llm.config import LlamaConfig

    with pytest.raises(UnsupportedError, match="multipliers are Granite's"):
        LlamaConfig(logits_scaling=2.0).to_hf_dict()


def test_gguf_granite_round_trip_as_llama_cpp_names_it(pair, tmp_path, write_tokenizer_gguf):
    """Written as llama.cpp's granite (multipliers as embedding/residual/logit/attention ``*_scale``, Q/K rows
    interleaved as for llama) and read back: the same logits as transformers' model."""
    gguf = pytest.importorskip("gguf")
    from efficientml.llm.io.gguf import GGUFFile
    from efficientml.llm.io.gguf_write import save_gguf
    from efficientml.llm.io.load import load_gguf
    from efficientml.llm.io.tokenizer import Tokenizer

    theirs, ours = pair
    tokens = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(93)]
    write_tokenizer_gguf(tmp_path / "tok.gguf", "llama", tokens, [2, 3, 3] + [1] * 93, scores=[0.0] * 96,
                         bos=1, eos=2)
    tok = Tokenizer.from_gguf(GGUFFile(tmp_path / "tok.gguf"))
    path = save_gguf(ours, tok, tmp_path / "granite.gguf", outtype="f32")
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["general.architecture"].contents() == "granite"
    assert fields["granite.logit_scale"].contents() == pytest.approx(SCALARS["logits_scaling"])
    back = load_gguf(GGUFFile(path))
    assert back.config.model_type == "granite"
    assert {k: pytest.approx(v) for k, v in SCALARS.items()} == {k: getattr(back.config, k) for k in SCALARS}
    ids = torch.randint(3, 96, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = theirs(ids).logits
        assert ((back(ids) - want).abs().max() / want.abs().max()).item() <= 1e-4
