import json

import pytest

from efficientml.cli.main import main


def test_quantize_bad_bits_is_one_line_error(capsys, tmp_path):
    assert main(["llm", "quantize", "smollm2-135m", "--w-bits", "9", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "--w-bits must be an integer from 2 to 8, got 9" in err and "Traceback" not in err
    assert not (tmp_path / "q").exists()


def test_quantize_refuses_existing_output_before_loading(capsys, tmp_path):
    (tmp_path / "q").mkdir()
    assert main(["llm", "quantize", "no-such-model", "--method", "rtn", "--out", str(tmp_path / "q")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_prune_bad_n_m(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:  # refused while parsing, before the model loads
        main(["llm", "prune", "smollm2-135m", "--n-m", "4:2", "--out", str(tmp_path / "p")])
    assert e.value.code == 2 and "expected N:M with 0 < N < M, such as 2:4, got '4:2'" in capsys.readouterr().err


def test_subcommands_registered():
    with pytest.raises(SystemExit):
        main(["llm", "quantize", "--help"])


def test_gptq_flags_reach_the_configs():
    import argparse

    from efficientml.cli.llm_compress import _config

    base = dict(w_bits=4, symmetric=False, alpha=0.5, act="dynamic", no_smooth=False)
    g = _config(argparse.Namespace(method="gptq", act_order=True, sink_share=0.0, **base), 64)
    assert (g.act_order, g.static_groups, g.sink_share) == (True, True, 0.0)
    a = _config(argparse.Namespace(method="awq-gptq", act_order=True, sink_share=0.1, **base), 64)
    assert (a.use_gptq, a.gptq_act_order, a.gptq_sink_share) == (True, True, 0.1)
    assert _config(argparse.Namespace(method="gptq", act_order=False, sink_share=None, **base), 64).sink_share == 0.05


def test_quantize_bad_sink_share_is_one_line_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["llm", "quantize", "smollm2-135m", "--method", "gptq", "--sink-share", "1.5", "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--sink-share: expected a number in [0, 1), got '1.5'" in err and "Traceback" not in err
    assert not (tmp_path / "q").exists()


TOKENS = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(97, 97 + 26)] + [f"t{i}" for i in range(99)]


@pytest.fixture
def tiny_gguf(tmp_path):
    """A 2-layer random model (widths 64 and 128) with a character tokenizer, as one GGUF file."""
    pytest.importorskip("gguf")
    from efficientml.llm.io.gguf import GGUFFile
    from efficientml.llm.io.gguf_write import save_gguf
    from efficientml.llm.io.tokenizer import Tokenizer

    from ..conftest import _write_tokenizer_gguf, tiny_model

    _write_tokenizer_gguf(tmp_path / "tok.gguf", "llama", TOKENS, [2, 3, 3] + [1] * 125, scores=[0.0] * 128,
                          bos=1, eos=2)
    tok = Tokenizer.from_gguf(GGUFFile(tmp_path / "tok.gguf"))
    return save_gguf(tiny_model(max_position_embeddings=128), tok, tmp_path / "tiny.gguf", outtype="f32")


def test_quantize_without_group_size_uses_the_default_group(tiny_gguf, tmp_path, capsys):
    """No --group-size: the largest of 128/64/32 dividing the widths 64 and 128 is 64; the folder loads back
    with 4-bit linears in groups of 64, and the report prints the recipe that ran."""
    from efficientml.llm.compress import QuantLinear, load_compressed

    out = tmp_path / "q"
    args = ["llm", "quantize", str(tiny_gguf), "--method", "gptq", "--calib", "tinyshakespeare-train",
            "--calib-samples", "4", "--calib-len", "64", "--out", str(out)]
    assert main(args + ["--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["config"]["group_size"] == 64 and rep["config"]["act_order"] and rep["config"]["static_groups"]
    assert rep["recipe"].startswith("gptq W4 g64 asymmetric, ")
    assert rep["recipe"].endswith("calibration 4 × 64 tokens of tinyshakespeare-train (seed 0)")
    model, _ = load_compressed(out)
    q = model.model.layers[0].mlp.down_proj
    assert isinstance(q, QuantLinear) and (q.in_features, q.spec.bits, q.spec.group_size) == (128, 4, 64)
    assert q.weight_scale.shape == (64, 2)  # (out, in / 64)
    assert main(args + ["--overwrite"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("recipe: gptq W4 g64 asymmetric, ") and "→" in text


def test_group_size_that_does_not_divide_is_one_sentence(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["llm", "quantize", str(tiny_gguf), "--method", "rtn", "--group-size", "48", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--group-size 48 does not divide the layer widths [64, 128]; use --group-size 64 " \
                              "or channel" in err[0]
    assert not out.exists()
