"""The model's own sampling defaults: generation_config.json read as transformers reads it, written so
transformers reads it back, carried by `llm convert`, and used by `llm generate` where no flag is given
(``--generation-config none`` and explicit flags win)."""

from __future__ import annotations

import json

import pytest

from efficientml.cli.main import main
from efficientml.core.errors import ConfigError
from efficientml.llm.config import LlamaConfig
from efficientml.llm.io.generation_config import generation_config, generation_defaults
from efficientml.llm.io.load import save_hf
from efficientml.llm.model import build_model, init_weights

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=3)


@pytest.fixture()
def folder(tmp_path):
    m = build_model(CFG, device="cpu")
    init_weights(m, seed=1)
    return save_hf(m, None, tmp_path / "m")


def _with(folder, gc: dict):
    (folder / "generation_config.json").write_text(json.dumps(gc))
    return folder


@pytest.mark.parametrize("gc, want", [
    ({"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
     {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}),  # Qwen2.5-Instruct
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.9}, {"temperature": 0.6, "top_p": 0.9}),  # Llama-3
    ({"do_sample": True}, {"temperature": 1.0}),
    ({"do_sample": True, "temperature": 0.5, "top_k": 0, "min_p": 0.05}, {"temperature": 0.5, "min_p": 0.05}),
    ({"temperature": 0.6, "top_p": 0.9}, {}),  # do_sample absent: transformers decodes greedily
    ({"do_sample": False, "temperature": 0.6, "repetition_penalty": 1.2}, {"repetition_penalty": 1.2}),
    ({"bos_token_id": 1, "eos_token_id": 2}, {}),
])
def test_read_as_transformers_does(folder, gc, want):
    got = generation_defaults(_with(folder, gc))
    assert got == want and all(type(v) is (int if k == "top_k" else float) for k, v in got.items())


def test_no_file_and_bad_values(folder):
    (folder / "generation_config.json").unlink()
    assert generation_defaults(folder) == {}
    with pytest.raises(ConfigError, match="generation_config.json.*top_p"):
        generation_defaults(_with(folder, {"do_sample": True, "top_p": 1.5}))
    with pytest.raises(ConfigError, match="not valid JSON"):
        (folder / "generation_config.json").write_text("{")
        generation_defaults(folder)


def test_written_for_transformers(folder, tmp_path):
    transformers = pytest.importorskip("transformers")
    want = {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "min_p": 0.05, "repetition_penalty": 1.05}
    m = build_model(CFG, device="cpu")
    out = save_hf(m, None, tmp_path / "s", sampling=want)
    theirs = transformers.GenerationConfig.from_pretrained(str(out))
    assert theirs.do_sample is True and theirs.pad_token_id == 3
    assert {k: getattr(theirs, k) for k in want} == want
    assert generation_defaults(out) == want
    greedy = generation_config(CFG, {"temperature": 0.0, "top_p": 0.9, "repetition_penalty": 1.1})
    assert "do_sample" not in greedy and "top_p" not in greedy and greedy["repetition_penalty"] == 1.1
    with pytest.raises(ConfigError, match="typical_p"):
        save_hf(m, None, tmp_path / "bad", sampling={"typical_p": 0.9})
    assert not (tmp_path / "bad").exists()


@pytest.fixture()
def sampling_smollm2(smollm2_hf_dir, tmp_path):
    """SmolLM2's folder (files linked) with a generation config that samples hot."""
    d = tmp_path / "hot"
    d.mkdir()
    for f in smollm2_hf_dir.iterdir():
        if f.name != "generation_config.json":
            (d / f.name).symlink_to(f)
    gc = json.loads((smollm2_hf_dir / "generation_config.json").read_text())
    return _with(d, {**gc, "do_sample": True, "temperature": 5.0, "top_k": 40})


def _generate(capsys, *args):
    rc = main(["llm", "generate", *args, "The capital of France is", "--max-new-tokens", "6", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)["completion"], err


def test_info_shows_them(sampling_smollm2, capsys):
    assert main(["llm", "info", str(sampling_smollm2), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sampling_defaults"] == {"temperature": 5.0, "top_k": 40}


def test_cli_uses_the_models_defaults_unless_told(sampling_smollm2, smollm2_hf_dir, capsys):
    greedy, err = _generate(capsys, str(smollm2_hf_dir))
    assert "generation config" not in err
    hot, err = _generate(capsys, str(sampling_smollm2), "--seed", "0")
    assert "sampling from the model's generation config: temperature=5.0, top_k=40" in err
    assert hot != greedy  # temperature 5 over 40 tokens: six greedy tokens in a row are (near) impossible
    assert _generate(capsys, str(sampling_smollm2), "--seed", "0")[0] == hot  # seeded: reproducible
    assert _generate(capsys, str(sampling_smollm2), "--generation-config", "none")[0] == greedy
    told, err = _generate(capsys, str(sampling_smollm2), "--temperature", "0")
    assert told == greedy and "temperature" not in err and "top_k=40" in err
