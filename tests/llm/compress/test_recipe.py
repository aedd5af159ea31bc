"""The recipe table: default group sizes from the widths, and the CLI's parsed defaults equal to the
benchmark's table rows (benchmarks/llm_compression_recipe.py builds them from the same table)."""

import importlib.util
from pathlib import Path

import pytest

from efficientml.cli.llm_compress import resolved_config
from efficientml.cli.main import build_parser, main
from efficientml.llm.compress import GPTQConfig
from efficientml.llm.compress.recipe import CALIB, default_group_size, describe, quantized_widths, recipe
from efficientml.llm.config import LlamaConfig

from ..conftest import tiny_config, tiny_model

ROOT = Path(__file__).resolve().parents[3]
SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_llm_compression_recipe",
                                                  ROOT / "benchmarks" / "llm_compression_recipe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("widths,group", [((576, 1536), 64), ((4096, 11008), 128), ((4096, 14336), 128),
                                          ((96, 160), 32), ((100, 300), None)])
def test_default_group_is_the_largest_candidate_dividing_every_width(widths, group):
    assert default_group_size(widths) == group


def test_quantized_widths_from_a_model_and_its_config():
    assert quantized_widths(SMOLLM2) == (576, 1536)
    assert quantized_widths(tiny_model()) == quantized_widths(tiny_config()) == (64, 128)
    wide = tiny_config(head_dim=32)  # o_proj's input is heads × head_dim = 128, not the hidden size
    assert quantized_widths(wide) == (64, 128)


def _parse(*flags):
    return build_parser().parse_args(["llm", "quantize", "smollm2-135m", *flags, "--out", "unused"])


def test_cli_defaults_are_the_benchmark_rows():
    bench = _bench()
    for meth in bench.RECIPE_NAMES:
        for sname in bench.SETTINGS:
            conf, calib = resolved_config(_parse(*bench.cli_argv(meth, sname)[3:]), SMOLLM2)
            assert conf == bench.row_config(meth, sname), (meth, sname)
            assert calib == CALIB
    chk = bench.cli_check(SMOLLM2, CALIB)
    assert chk["configs_equal"] and chk["calibration_equal"]
    assert chk["rows"]["gptq_w3g64"]["command"] == "efficientml llm quantize smollm2-135m --method gptq --w-bits 3"


def test_gptq_recipe_and_its_flags():
    conf, calib = resolved_config(_parse("--method", "gptq", "--w-bits", "3"), SMOLLM2)
    assert isinstance(conf, GPTQConfig) and conf == recipe("gptq", 3, 64)
    assert (conf.act_order, conf.static_groups, conf.propagate) == (True, True, "fp")
    assert (calib.source, calib.n_samples, calib.seq_len, calib.seed) == ("wikitext2-valid", 128, 512, 0)
    plain, _ = resolved_config(_parse("--method", "gptq", "--no-act-order", "--damp", "0.01", "--sink-share", "0",
                                      "--propagate", "quantized"), SMOLLM2)
    assert (plain.act_order, plain.static_groups, plain.damp, plain.sink_share, plain.propagate) == \
        (False, False, 0.01, 0.0, "quantized")
    both, _ = resolved_config(_parse("--method", "awq-gptq", "--damp", "0.2", "--sink-rule", "tokens"), SMOLLM2)
    assert (both.use_gptq, both.gptq_damp, both.gptq_sink_rule, both.gptq_act_order) == (True, 0.2, "tokens", True)
    _, mixed = resolved_config(_parse("--calib", "wikitext2-valid,tinyshakespeare-train", "--calib-samples", "64"),
                               SMOLLM2)
    assert mixed.sources == ("wikitext2-valid", "tinyshakespeare-train") and mixed.counts() == (32, 32)
    text = describe(conf, calib, "gptq")
    assert text.startswith("gptq W3 g64 asymmetric, ") and "act_order=True" in text
    assert text.endswith("calibration 128 × 512 tokens of wikitext2-valid (seed 0)")


@pytest.mark.parametrize("flags,message", [
    (["--method", "rtn", "--damp", "0.1"], "--damp applies to --method gptq or awq-gptq, not rtn"),
    (["--method", "awq-gptq", "--propagate", "quantized"], "--propagate applies to --method gptq"),
])
def test_gptq_flags_elsewhere_are_one_sentence(capsys, tmp_path, flags, message):
    assert main(["llm", "quantize", "smollm2-135m", *flags, "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()


def test_bad_damp_refused_while_parsing(capsys):
    with pytest.raises(SystemExit) as e:
        _parse("--method", "gptq", "--damp", "1")
    assert e.value.code == 2 and "--damp: expected a number in (0, 1), got '1'" in capsys.readouterr().err


def test_gptq_grid_is_mse_for_groups_and_min_max_per_channel():
    from efficientml.llm.compress.recipe import recipe

    assert recipe("gptq", 3, 64).grid == "mse" and recipe("gptq", 4, None, True).grid == "minmax"
    assert recipe("awq-gptq", 4, None, True).gptq_grid == "mse" and recipe("awq-gptq", 3, 64).gptq_grid == "mse"
    assert recipe("gptq", 4, None, grid="mse").grid == "mse"  # an explicit override still wins
