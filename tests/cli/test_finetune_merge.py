"""``efficientml finetune … --merge-into w4``: a QLoRA run on a tiny GGUF model writes the adapter, the
merged W4 model as a packed checkpoint and as GGUF (both load back with the calibrated model's logits),
and the perplexities of base+adapter, calibrated and naive merges; refused in one line before any
work for full fine-tuning (nothing to merge) or a tokenizer with no GGUF form."""

import json

import pytest
import torch

from efficientml.cli.main import main

from ..llm.conftest import _write_tokenizer_gguf, tiny_model

TOKENS = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(97, 97 + 26)] + [f"t{i}" for i in range(99)]


@pytest.fixture
def tiny_gguf(tmp_path):
    pytest.importorskip("gguf")
    from efficientml.llm.io.gguf import GGUFFile
    from efficientml.llm.io.gguf_write import save_gguf
    from efficientml.llm.io.tokenizer import Tokenizer

    _write_tokenizer_gguf(tmp_path / "tok.gguf", "llama", TOKENS, [2, 3, 3] + [1] * 125, scores=[0.0] * 128,
                          bos=1, eos=2)
    tok = Tokenizer.from_gguf(GGUFFile(tmp_path / "tok.gguf"))
    return save_gguf(tiny_model(max_position_embeddings=128), tok, tmp_path / "tiny.gguf", outtype="f32"), tok


@pytest.mark.parametrize("method", ["qlora", "w4lora"])
def test_merge_into_w4_writes_packed_and_gguf(tmp_path, tiny_gguf, capsys, method):
    from efficientml.llm.io.load import load

    src, tok = tiny_gguf
    out = tmp_path / "ft"
    rc = main(["finetune", str(src), "--method", method, "--dataset", "tinyshakespeare", "--max-chars", "4000",
               "--steps", "2", "--batch-size", "2", "--max-length", "16", "--eval-rows", "2", "--merge-into", "w4",
               "--calib-samples", "8", "--out", str(out), "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                   "merged-w4", "merged-w4.gguf", "training_log.json"]
    ppl = rep["merged"]["perplexity"]
    assert set(ppl) == {"adapter", "calibrated", "naive"} and all(v > 1 for v in ppl.values())
    assert rep["merged"]["method"] == {"qlora": "gptq", "w4lora": "gptq_on_base_grid"}[method]
    packed, _ = load(out / "merged-w4")
    from_gguf, _ = load(out / "merged-w4.gguf")
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(from_gguf(ids), packed(ids), rtol=1e-3, atol=1e-3)  # Q4_0 = our W4 g32


def test_merge_into_refusals(tmp_path, tiny_gguf, capsys):
    from efficientml.llm.io.load import save_hf

    rc = main(["finetune", "smollm2-135m", "--dataset", "tinyshakespeare", "--method", "full", "--merge-into", "w4",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "--merge-into merges a LoRA/QLoRA adapter" in err and err.count("\n") == 1
    folder = save_hf(tiny_model(max_position_embeddings=128), tiny_gguf[1], tmp_path / "hf")  # scores dropped
    rc = main(["finetune", str(folder), "--dataset", "tinyshakespeare", "--merge-into", "w4", "--steps", "1",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "written to GGUF only with its piece scores" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()  # refused before training, nothing written
