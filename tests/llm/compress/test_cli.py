import pytest

from efficientml.cli.main import main


def test_quantize_bad_bits_is_one_line_error(capsys, tmp_path):
    assert main(["llm", "quantize", "smollm2-135m", "--w-bits", "9", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "weight bits must be an integer from 2 to 8" in err and "Traceback" not in err
    assert not (tmp_path / "q").exists()


def test_quantize_refuses_existing_output_before_loading(capsys, tmp_path):
    (tmp_path / "q").mkdir()
    assert main(["llm", "quantize", "no-such-model", "--method", "rtn", "--out", str(tmp_path / "q")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_prune_bad_n_m(capsys, tmp_path):
    assert main(["llm", "prune", "smollm2-135m", "--n-m", "4:2", "--out", str(tmp_path / "p")]) == 2
    assert "n_m must be (N, M)" in capsys.readouterr().err


def test_subcommands_registered():
    with pytest.raises(SystemExit):
        main(["llm", "quantize", "--help"])
