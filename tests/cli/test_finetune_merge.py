"""``efficientml finetune … --merge-into w4``: refused in one line for full fine-tuning (nothing to merge),
before any model is loaded."""

from efficientml.cli.main import main


def test_merge_into_needs_an_adapter(tmp_path, capsys):
    rc = main(["finetune", "smollm2-135m", "--dataset", "tinyshakespeare", "--method", "full", "--merge-into", "w4",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "--merge-into merges a LoRA/QLoRA adapter" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
