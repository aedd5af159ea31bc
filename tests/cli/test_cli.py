"""The CLI: --help everywhere, JSON output, and one clear sentence (no traceback) on bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from efficientml.cli.main import SUBCOMMANDS, build_parser, main


def _run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "profile", "train", "eval"):
        assert cmd in out


@pytest.mark.parametrize("cmd", ["demo", "profile", "train", "eval"])
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and "usage: efficientml " + cmd in capsys.readouterr().out


def test_unknown_model_is_one_sentence(capsys):
    rc, _, err = _run(["train", "resnet21", "--epochs", "1"], capsys)
    assert rc == 2
    assert err.startswith("efficientml: error: unknown model 'resnet21' (did you mean 'resnet")
    assert "Traceback" not in err and err.count("\n") == 1


def test_missing_checkpoint_file(capsys, tmp_path):
    rc, _, err = _run(["eval", str(tmp_path / "nope.safetensors")], capsys)
    assert rc == 2 and "nope.safetensors' does not exist" in err and "Traceback" not in err


def test_bad_option_value(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "vgg", "--batch-size", "-3"])
    assert e.value.code == 2
    assert "expected a positive integer, got '-3'" in capsys.readouterr().err


def test_bad_model_arg_and_config_value(capsys):
    rc, _, err = _run(["train", "vgg", "--model-arg", "width"], capsys)
    assert rc == 2 and "--model-arg expects KEY=VALUE, got 'width'" in err
    rc, _, err = _run(["train", "vgg", "--optimizer", "lion"], capsys)
    assert rc == 2 and "optimizer must be one of ['adamw', 'sgd'], got 'lion'" in err


def test_wrong_input_shape_in_profile(capsys):
    rc, _, err = _run(["profile", "resnet20", "--input-shape", "1,1,32,32"], capsys)
    assert rc == 2 and "Traceback" not in err
    assert "1×1×32×32" in err or "(1, 1, 32, 32)" in err or "1,1,32,32" in err


def test_debug_shows_traceback():
    out = subprocess.run([sys.executable, "-m", "efficientml", "--debug", "train", "nosuch"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_train_and_eval_round_trip_with_json(capsys, tmp_path):
    ck = tmp_path / "small.safetensors"
    rc, out, _ = _run(["train", "small_cnn", "--epochs", "1", "--train-subset", "512", "--json",
                       "--out", str(ck), "--threads", "1"], capsys)
    assert rc == 0
    res = json.loads(out)
    assert res["checkpoint"] == str(ck) and 10.0 < res["test_accuracy"] <= 100.0
    rc, out, _ = _run(["eval", str(ck), "--json"], capsys)
    ev = json.loads(out)
    assert rc == 0 and ev["examples"] == 10000
    assert ev["accuracy"] == pytest.approx(res["test_accuracy"], abs=1e-9)


def test_demo_pipeline(tmp_path, capsys):
    """The default job: every stage reported, the engine's C bit-exact, the files written, and a second
    run refusing to replace them without --overwrite."""
    argv = ["demo", "--json", "--runs", "2", "--finetune-images", "768", "--test-images", "512",
            "--out", str(tmp_path)]
    rc, out, _ = _run(argv, capsys)
    rep = json.loads(out)
    assert rc == 0
    stages = rep["stages"]
    assert [s["stage"] for s in stages][0] == "baseline fp32" and len(stages) == 4
    assert stages[0]["accuracy"] > 85 and stages[0]["params"] > 2 * stages[1]["params"]
    assert abs(stages[3]["accuracy"] - stages[2]["accuracy"]) <= 0.6   # PyTorch's kernels: within an LSB
    assert rep["engine"]["bit_exact"]["mismatched_images"] == 0 and rep["engine"]["bit_exact"]["images"] == 512
    assert stages[3]["peak_activation_bytes"] <= stages[2]["peak_activation_bytes"]
    for name in ("report.json", "report.md", "vgg_fmnist_engine.c", "vgg_fmnist_engine.h"):
        assert (tmp_path / name).stat().st_size > 0
    before = (tmp_path / "report.md").read_text()
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and "already exists" in err and "--overwrite" in err and err.count("\n") == 1
    assert (tmp_path / "report.md").read_text() == before


def test_demo_resnet_profile_json(capsys):
    rc, out, _ = _run(["demo", "--model", "resnet20", "--json", "--runs", "3"], capsys)
    rep = json.loads(out)
    assert rc == 0
    assert rep["cifar_samples"]["correct"] == 20 and rep["cifar_samples"]["total"] == 20
    assert rep["profile"]["params"] == 269_722
    assert rep["latency_ms"]["batch1"]["threads"] == 2


def _subparsers(parser):
    return next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")


def test_every_listed_subcommand_exists_and_parses(capsys):
    sub = _subparsers(build_parser())
    assert list(sub.choices) == SUBCOMMANDS  # nothing listed that is not there, in --help order
    for cmd in SUBCOMMANDS:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0, cmd
        assert f"usage: efficientml {cmd}" in capsys.readouterr().out
    llm_sub = _subparsers(sub.choices["llm"])
    assert set(llm_sub.choices) == {"info", "ppl", "generate", "chat", "convert", "quantize", "prune", "serve"}
    for cmd in llm_sub.choices:
        with pytest.raises(SystemExit) as e:
            main(["llm", cmd, "--help"])
        assert e.value.code == 0 and f"usage: efficientml llm {cmd}" in capsys.readouterr().out


# optional extras (plot, data, llm, export, compare, serve) and triton: none may be needed to build the parser
OPTIONAL = ["matplotlib", "sklearn", "tokenizers", "gguf", "jinja2", "huggingface_hub", "onnx",
            "onnxruntime", "transformers", "compressed_tensors", "sentencepiece", "triton",
            "fastapi", "uvicorn", "prometheus_client", "pydantic", "httpx", "openai"]

_HIDDEN = r"""
import importlib.abc, json, sys
BLOCKED = set(sys.argv[1].split(","))
refused = []

class Refuse(importlib.abc.MetaPathFinder):   # as if the optional packages were not installed
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            refused.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Refuse())
try:
    import tokenizers
    hidden = False
except ModuleNotFoundError:
    hidden = True
from efficientml.cli.main import build_parser
parser = build_parser()
sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
print(json.dumps({"hidden": hidden, "prog": parser.prog, "commands": list(sub.choices),
                  "loaded": loaded}))
"""


def test_parser_builds_without_optional_packages():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _HIDDEN, ",".join(OPTIONAL)], capture_output=True,
                          text=True, env=env, cwd=root, timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["hidden"] is True            # the finder really refuses them
    assert r["prog"] == "efficientml" and r["commands"] == SUBCOMMANDS
    assert r["loaded"] == []
