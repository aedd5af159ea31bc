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
