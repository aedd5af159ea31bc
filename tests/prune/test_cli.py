import json

from efficientml.cli.main import main


def test_cli_prune_channel_writes_report(tmp_path, capsys):
    out, rep = tmp_path / "p.safetensors", tmp_path / "r.json"
    rc = main(["prune", "vgg", "--model-arg", "width=0.125", "--method", "channel", "--ratio", "0.5",
               "--train-subset", "256", "--test-subset", "200", "--threads", "1", "--finetune-epochs", "0.1", "--no-latency", "--out", str(out),
               "--report", str(rep), "--json"])
    assert rc == 0
    report = json.loads(rep.read_text())
    assert report["config"]["method"] == "channel" and report["config"]["sparsity"] == 0.5
    assert report["table"]["after"]["params"] < report["table"]["before"]["params"]
    from efficientml.prune.io import load_pruned

    model, meta = load_pruned(out)
    assert model.backbone.conv0.out_channels == 4 and meta["prune_config"]["method"] == "channel"


def test_cli_bad_ratio_is_one_line(capsys):
    try:
        main(["prune", "vgg", "--ratio", "1.5"])
    except SystemExit as e:
        assert e.code == 2
    err = capsys.readouterr().err
    assert "expected a number in [0, 1)" in err and "Traceback" not in err


def test_cli_nm_not_divisible_error(capsys):
    rc = main(["prune", "vgg", "--model-arg", "width=0.125", "--method", "nm", "--layers", "backbone.conv0",
               "--no-latency", "--train-subset", "64", "--test-subset", "64", "--threads", "1"])
    assert rc == 2
    assert "not divisible by M=4" in capsys.readouterr().err
