"""Every checkpoint a command writes is read by every command that takes one:
train → prune (channel) → quantize → eval → profile, and prune --checkpoint of a pruned model."""

import json

import pytest
from safetensors import safe_open

from efficientml.cli.main import main


def _run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def _param_count(path):
    """Parameters in the file: every tensor except BatchNorm's running statistics."""
    with safe_open(str(path), framework="pt") as f:
        return sum(f.get_tensor(k).numel() for k in f.keys()
                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    ck = tmp_path_factory.mktemp("chain") / "cnn.safetensors"
    assert main(["train", "small_cnn", "--epochs", "1", "--train-subset", "256", "--json", "--out", str(ck),
                 "--threads", "1"]) == 0
    return ck


def test_train_prune_quantize_eval_profile(trained, tmp_path, capsys):
    pruned = tmp_path / "pruned.safetensors"
    rep = _run(["prune", "small_cnn", "--checkpoint", str(trained), "--method", "channel", "--ratio", "0.5",
                "--test-subset", "256", "--train-subset", "256", "--no-latency", "--json", "--out", str(pruned)],
               capsys)
    after = rep["table"]["after"]
    assert after["params"] < rep["table"]["before"]["params"]       # physically smaller

    prof = _run(["profile", "--checkpoint", str(pruned), "--json", "--no-layers"], capsys)
    assert prof["params"] == after["params"] == _param_count(pruned)

    ev = _run(["eval", str(pruned), "--json"], capsys)
    assert ev["examples"] == 10000

    quant = tmp_path / "q.safetensors"
    q = _run(["quantize", str(pruned), "--method", "weight", "--format", "int8", "--json", "--out", str(quant)],
             capsys)
    assert q["fp32_accuracy"] == pytest.approx(ev["accuracy"], abs=1e-9)   # the same pruned model
    ev_q = _run(["eval", str(quant), "--json"], capsys)
    assert ev_q["accuracy"] == pytest.approx(q["quantized_accuracy"], abs=1e-9)  # the written weights are the ones evaluated
    prof_q = _run(["profile", "--checkpoint", str(quant), "--json", "--no-layers"], capsys)
    assert prof_q["params"] == after["params"] and prof_q["macs"] == prof["macs"]

    again = tmp_path / "again.safetensors"
    rep2 = _run(["prune", "small_cnn", "--checkpoint", str(pruned), "--method", "channel", "--ratio", "0.25",
                 "--test-subset", "256", "--no-latency", "--json", "--out", str(again)], capsys)
    assert rep2["table"]["before"]["params"] == after["params"]
    assert rep2["table"]["after"]["params"] < after["params"]
    i8 = _run(["quantize", str(again), "--method", "int8", "--skip-unsupported", "--eval-batches", "2",
                "--json"], capsys)
    assert i8["quantized_accuracy"] == pytest.approx(i8["fp32_accuracy"], abs=5.0)


def test_existing_outputs_are_refused_then_replaced_with_overwrite(trained, tmp_path, capsys):
    before = trained.read_bytes()
    rc = main(["train", "small_cnn", "--epochs", "1", "--train-subset", "64", "--out", str(trained)])
    err = capsys.readouterr().err
    assert rc == 2 and "already exists" in err and "--overwrite" in err
    assert trained.read_bytes() == before
    out = tmp_path / "p.safetensors"
    out.write_bytes(b"mine")
    rc = main(["prune", "small_cnn", "--checkpoint", str(trained), "--out", str(out), "--no-latency"])
    assert rc == 2 and out.read_bytes() == b"mine"
    capsys.readouterr()
    rc = main(["prune", "small_cnn", "--checkpoint", str(trained), "--out", str(out), "--no-latency", "--overwrite",
               "--test-subset", "64", "--train-subset", "64", "--json"])
    assert rc == 0 and out.read_bytes()[:8] != b"mine"
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors", "p.safetensors.json"]
    assert (out.stat().st_mode & 0o777) == (out.with_suffix(".safetensors.json").stat().st_mode & 0o777)
