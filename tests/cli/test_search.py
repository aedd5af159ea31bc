"""``efficientml search``: analytical costs and TinyNAS statistics, the supernet trained on real
Fashion-MNIST for a few steps, a search with its history and plot, and the extracted subnet as a plain
``mbnet`` checkpoint that ``profile`` takes (the int8 engine path: tests/nas/test_ofa.py); bad input is one sentence, exit 2, and no
file is replaced unasked."""

from __future__ import annotations

import json

import pytest

from efficientml.cli.main import main
from efficientml.nas.costs import subnet_cost
from efficientml.nas.space import MBSpace


def _json(capsys, argv):
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_costs_and_space(capsys):
    d = _json(capsys, ["search", "costs", "largest"])
    c = subnet_cost(MBSpace(), MBSpace().largest())
    assert (d["params"], d["macs"], d["peak_bytes_int8"]) == (c.params, c.macs, c.peak_bytes(8))
    d = _json(capsys, ["search", "space", "--sram", "64", "--flash", "512", "--samples", "30"])
    assert len(d["tinynas"]["rows"]) == 12 and d["tinynas"]["pick"]["resolution"] < 28


@pytest.mark.parametrize("argv, words", [
    (["search", "costs", "random:x"], "integer seed"),
    (["search", "costs", '{"resolution": 30}'], "lacks a field"),
    (["search", "space", "--sram", "64"], "both --sram and --flash"),
    (["search"], "choose an action"),
    (["search", "run", "--supernet", "missing.safetensors", "--out", "h.json", "--max-latency-ms", "3"], "--lut"),
])
def test_bad_input_is_one_sentence(capsys, tmp_path, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_train_search_extract_round_trip(capsys, tmp_path):
    sup = tmp_path / "ofa.safetensors"
    assert main(["search", "train", "--out", str(sup), "--epochs", "0.02,0.02,0.02,0.02",
                 "--train-images", "768"]) == 0
    assert sup.is_file() and (tmp_path / "ofa.safetensors.json").is_file()
    before = sup.read_bytes()
    assert main(["search", "train", "--out", str(sup), "--epochs", "1,1,1,1"]) == 2   # never replaced unasked
    assert "exists" in capsys.readouterr().err and sup.read_bytes() == before
    hist = tmp_path / "h.json"
    d = _json(capsys, ["search", "run", "--supernet", str(sup), "--strategy", "random", "--budget", "3",
                       "--val-images", "200", "--sram", "120", "--out", str(hist)])
    assert d["evaluations"] == 3 and hist.is_file() and hist.with_suffix(".png").is_file()
    recs = json.loads(hist.read_text())["records"]
    assert all(r["costs"]["peak_bytes_int8"] <= 120 * 1024 and 0 <= r["score"] <= 100 for r in recs)
    sub = tmp_path / "sub.safetensors"
    d = _json(capsys, ["search", "extract", "--supernet", str(sup), "--arch", str(hist), "--out", str(sub)])
    meta = json.loads((tmp_path / "sub.safetensors.json").read_text())
    assert meta["model"] == "mbnet" and d["arch"] == json.loads(hist.read_text())["best"]["arch"]
    res = meta["resolution"]
    prof = _json(capsys, ["profile", "--checkpoint", str(sub), "--input-shape", f"1,1,{res},{res}"])
    assert prof["params"] == d["params"] and prof["macs"] == d["macs"]
    assert main(["search", "extract", "--supernet", str(sub), "--arch", "largest",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "supernet checkpoint" in capsys.readouterr().err
