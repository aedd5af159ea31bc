"""`efficientml distill` and `prune --teacher` on tiny models and a tiny data budget; bad input is one
sentence, exit code 2, and leaves no file behind."""

import json
import re

import pytest

from efficientml.cli.main import main
from efficientml.models import build_model
from efficientml.train import load_checkpoint, save_checkpoint

BUDGET = ["--epochs", "1", "--train-subset", "256", "--test-subset", "128", "--threads", "1"]


def _run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    kwargs = {"num_classes": 10, "in_channels": 1}
    save_checkpoint(path, build_model("small_cnn", **kwargs), {"model": "small_cnn", "model_kwargs": kwargs,
                                                                "dataset": "fashion-mnist", "pad_to": None})
    return str(path)


def test_distill_hint_writes_a_student_checkpoint_and_a_json_report(teacher, tmp_path, capsys):
    out = tmp_path / "student.safetensors"
    rc, stdout, err = _run(["distill", "--teacher", teacher, "--student", "small_cnn", "--student-arg", "width=0.25",
                            "--method", "hint", "--alpha", "0.5", "--json", "--out", str(out), *BUDGET], capsys)
    assert rc == 0, err
    rep = json.loads(stdout)
    assert rep["config"]["method"] == "hint" and rep["config"]["alpha"] == 0.5 and rep["history"]["steps"] == 2
    assert 0.0 <= rep["student_accuracy"] <= 100.0 and rep["checkpoint"] == str(out)
    epoch = rep["history"]["epochs"][0]
    assert {"loss_ce", "loss_kd", "loss_hint"} <= set(epoch)
    model, meta = load_checkpoint(out)
    assert model.features.conv0.out_channels == 8                  # the width-0.25 student, not the teacher
    assert meta["distill_config"]["method"] == "hint" and meta["teacher"] == teacher
    assert meta["test_accuracy"] == rep["student_accuracy"]


def test_distill_refuses_to_replace_an_output_unless_overwrite(teacher, tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"keep me")
    rc, _, err = _run(["distill", "--teacher", teacher, "--student", "small_cnn", "--out", str(out), *BUDGET], capsys)
    assert rc == 2 and "already exists" in err and "--overwrite" in err and err.count("\n") == 1
    assert out.read_bytes() == b"keep me"
    rc, _, err = _run(["distill", "--teacher", teacher, "--student", "small_cnn", "--method", "kd", "--out", str(out),
                       "--overwrite", *BUDGET], capsys)
    assert rc == 0, err
    assert load_checkpoint(out)[1]["distill_config"]["method"] == "kd"


@pytest.mark.parametrize("extra, match", [
    (["--method", "fitnet"], "--method must be one of"),
    (["--method", "hint", "--student-layers", "features.relu0"], "pair up one to one; got 1 and 0"),
    (["--method", "hint", "--student-layers", "features.relu9", "--teacher-layers", "features.relu1"],
     "has no module named 'features.relu9'"),
    (["--method", "kd", "--student-layers", "a", "--teacher-layers", "b"], "uses no intermediate layers"),
    (["--student", "small_cnn", "--student-arg", "widht"], "--student-arg expects KEY=VALUE"),
    (["--out", "student.pt"], "must end in .safetensors"),
    (["--teacher", "missing.safetensors"], "missing.safetensors"),
    (["--alpha", "1.5"], r"expected a weight in \[0, 1\]"),
    (["--temperature", "nan"], "expected a temperature"),
])
def test_distill_bad_input_is_one_sentence_and_writes_nothing(extra, match, teacher, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["distill", "--teacher", teacher, "--student", "small_cnn", "--out", "s.safetensors", *BUDGET]
    for flag in ("--teacher", "--student", "--out"):
        if flag in extra:
            i = argv.index(flag)
            del argv[i:i + 2]
    try:
        rc, _, err = _run(argv + extra, capsys)
    except SystemExit as e:                                        # argparse usage errors exit here
        rc, err = e.code, capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert re.search(match, err), err
    assert not list(tmp_path.iterdir())                            # nothing written, not even a temp file


def test_distill_json_error_is_reported_on_stdout(teacher, tmp_path, capsys):
    rc, out, _ = _run(["distill", "--teacher", teacher, "--student", str(tmp_path / "nope.safetensors"), "--json",
                       "--out", str(tmp_path / "s.safetensors"), *BUDGET], capsys)
    assert rc == 2 and json.loads(out)["exit_code"] == 2 and "nope.safetensors" in json.loads(out)["error"]


def test_prune_with_teacher_self_fine_tunes_with_kd_and_the_student_checkpoint_distills(teacher, tmp_path, capsys):
    pruned = tmp_path / "pruned.safetensors"
    rc, out, err = _run(["prune", "small_cnn", "--checkpoint", teacher, "--ratio", "0.5", "--finetune-epochs", "1",
                         "--train-subset", "256", "--test-subset", "128", "--no-latency", "--teacher", "self",
                         "--kd-temperature", "2", "--out", str(pruned), "--json", "--threads", "1"], capsys)
    assert rc == 0, err
    assert json.loads(out)["distill"] == {"teacher": "self", "temperature": 2.0, "weight": 1.0}
    student = tmp_path / "student.safetensors"
    rc, _, err = _run(["distill", "--teacher", teacher, "--student", str(pruned), "--method", "at",
                       "--out", str(student), *BUDGET], capsys)
    assert rc == 0, err
    from efficientml.prune.io import load_pruned

    model, meta = load_pruned(student)                             # still the pruned shapes
    assert model.features.conv0.out_channels == 16 and meta["distill_config"]["method"] == "at"


def test_prune_teacher_needs_fine_tuning(teacher, tmp_path, capsys):
    rc, _, err = _run(["prune", "small_cnn", "--checkpoint", teacher, "--teacher", "self",
                       "--out", str(tmp_path / "p.safetensors")], capsys)
    assert rc == 2 and "--finetune-epochs" in err and not list(tmp_path.iterdir())
