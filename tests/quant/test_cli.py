from efficientml.cli.main import main


def test_formats_json(capsys):
    assert main(["formats", "fp8_e4m3", "mxfp4", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"max": 448.0' in out and '"bits_per_element": 4.25' in out


def test_formats_unknown(capsys):
    assert main(["formats", "fp9"]) == 2
    assert "unknown number format 'fp9'" in capsys.readouterr().err
