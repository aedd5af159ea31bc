"""SmolLM2-135M from the GGUF file against transformers' LlamaForCausalLM on the Hugging Face folder we
wrote from it: fp32 logits agree on a real prompt."""

from __future__ import annotations

import torch

from efficientml.data.paths import resolve


def test_fp32_logits_match_transformers(smollm2, hf_smollm2):
    model, tok = smollm2
    text = resolve("text/wikitext-2-raw-test.raw").read_text(encoding="utf-8")[:400]
    ids = torch.tensor([tok.encode(text)[:80]])
    with torch.no_grad():
        ours = model(ids)
        ref = hf_smollm2(ids).logits
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()  # max error relative to the logit scale
    assert rel <= 1e-4, rel
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_hf_folder_loads_back_identically(smollm2, smollm2_hf_dir):
    from efficientml.llm.io.load import load

    again, tok = load(smollm2_hf_dir)
    for (k, a), (_, b) in zip(smollm2[0].state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert tok.encode("Hello world") == smollm2[1].encode("Hello world")
    files = sorted(p.name for p in smollm2_hf_dir.iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]


def test_gguf_tensors_equal_transformers_gguf_loader(smollm2, hf_smollm2):
    """The real Q4_1 GGUF decoded by transformers' own loader (gguf's decoders, its Q/K un-permutation)
    gives exactly our weights: the parity above does not rest on our GGUF reading."""
    import numpy as np
    import pytest

    pytest.importorskip("gguf")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from efficientml.llm.io.source import resolve_source

    theirs = load_gguf_checkpoint(str(resolve_source("smollm2-135m")), return_tensors=True,
                                  model_to_load=hf_smollm2)["tensors"]
    ours = smollm2[0].state_dict()
    assert len(theirs) == 1 + 30 * 9 + 1  # embedding (tied lm_head), 30 blocks of 9, final norm
    for k, v in theirs.items():
        assert torch.equal(ours[k], torch.as_tensor(np.asarray(v), dtype=torch.float32)), k
