"""``efficientml engine build|run|mcu``: the files written (and never overwritten unasked), the plan
report's numbers, the --sram budget, bit-exactness on this machine and under QEMU, and real
Fashion-MNIST calibration when the dataset is known."""

from __future__ import annotations

import json
import math

import pytest
import torch

from efficientml.cli.main import main
from tests.engine.conftest import needs_cc, needs_mcu

NET = '''import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool = nn.Conv2d(1, 8, 3, padding=1), nn.MaxPool2d(2)
        self.dw, self.pw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 14 * 14, 10)

    def forward(self, x):
        y = self.pool(self.conv(x).relu())
        z = self.dw(y).relu()              # y dies here: depthwise in place
        return self.fc((z + self.pw(z)).flatten(1))     # both addends die: add in place
'''


@pytest.fixture
def net(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFICIENTML_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("sys.dont_write_bytecode", True)
    (tmp_path / "net.py").write_text(NET)
    return [f"{tmp_path}/net.py:Net", "--input-shape", "1,1,28,28"]


def _run(argv, capsys):
    flat = [x for a in argv for x in (a if isinstance(a, list) else [a])]
    rc = main([str(a) for a in flat])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _json(argv, capsys):
    rc, out, err = _run([*argv, "--json"], capsys)
    assert rc == 0, err
    return json.loads(out)


def test_build_writes_c_header_and_plan(net, tmp_path, capsys):
    out = tmp_path / "gen"
    rep = _json(["engine", "build", net, "--out", out, "--prefix", "net"], capsys)
    assert sorted(p.name for p in out.iterdir()) == ["net.c", "net.h", "net_plan.json"]
    assert json.loads((out / "net_plan.json").read_text()) == rep
    assert "int net_run(const uint8_t *in, uint8_t *out);" in (out / "net.h").read_text()
    assert "#define NET_ARENA_SIZE %d" % rep["arena_bytes"] in (out / "net.h").read_text()
    assert "random normal" in rep["calibration"] and rep["input_shape"] == [1, 1, 28, 28]
    # the pool's input (the conv's 8×28×28 = 6272 B) and output (8×14×14 = 1568 B): the peak
    assert rep["live_peak_bytes"] == 6272 + 1568 <= rep["arena_bytes"] < rep["no_reuse_bytes"]
    assert rep["peak_op"] == "pool"
    assert rep["per_layer_peak_bytes"] > 0 and rep["arena_vs_per_layer"] == rep["arena_bytes"] / rep[
        "per_layer_peak_bytes"]
    assert {"depthwise", "add"} <= {o["kind"] for o in rep["ops"] if o["name"] in rep["inplace_ops"]}
    assert max(o["live_bytes"] for o in rep["ops"]) == rep["live_peak_bytes"]


def test_build_refuses_to_overwrite_without_force(net, tmp_path, capsys):
    out = tmp_path / "gen"
    out.mkdir()
    (out / "model.h").write_text("mine\n")
    rc, _, err = _run(["engine", "build", net, "--out", out], capsys)
    assert rc == 2 and err.count("\n") == 1 and "already exists" in err and "Traceback" not in err
    assert (out / "model.h").read_text() == "mine\n" and sorted(p.name for p in out.iterdir()) == ["model.h"]
    rc, _, err = _run(["engine", "build", net, "--out", out, "--force"], capsys)
    assert rc == 0, err
    assert (out / "model.h").read_text().startswith("/* model.h: generated")


def test_sram_budget_names_the_smallest_that_fits(net, tmp_path, capsys):
    arena = _json(["engine", "build", net, "--out", tmp_path / "a"], capsys)["arena_bytes"]
    rc, _, err = _run(["engine", "build", net, "--out", tmp_path / "b", "--sram", "2"], capsys)
    need = math.ceil(arena / 102.4) / 10
    assert rc == 2 and err.count("\n") == 1
    assert f"the arena needs {arena:,} bytes" in err and f"smallest budget that fits is {need:g} KB" in err
    assert not (tmp_path / "b").exists()
    rep = _json(["engine", "build", net, "--out", tmp_path / "b", "--sram", f"{need:g}"], capsys)
    assert rep["arena_bytes"] == arena and rep["sram_budget_kb"] == need


def test_build_names_an_op_the_engine_lacks(tmp_path, capsys):
    rc, _, err = _run(["engine", "build", "small_cnn", "--skip-unsupported", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "no kernel for op 'AdaptiveAvgPool2d' (layer 'features.avgpool')" in err
    assert not (tmp_path / "o").exists()


@needs_cc
def test_run_is_bit_exact_and_timed(net, capsys):
    rep = _json(["engine", "run", net, "--samples", "5", "--runs", "2", "--warmup", "0"], capsys)
    assert rep["bit_exact"] is True and rep["mismatched_codes"] == 0 and rep["output_codes"] == 50
    assert rep["inputs"] == "5 random normal inputs"
    assert all(v > 0 for v in rep["latency_ms"].values()) and set(rep["latency_ms"]) == {
        "engine_c", "torch_int8", "torch_fp32"}
    assert rep["engine_vs_torch_int8"] == pytest.approx(rep["latency_ms"]["torch_int8"] / rep["latency_ms"]["engine_c"])


@needs_cc
def test_checkpoint_with_its_dataset_calibrates_on_real_images(net, tmp_path, capsys):
    """A plain state dict + --model: the dataset named gives real calibration and test images."""
    from efficientml.cli.model_source import build

    torch.manual_seed(0)
    state = tmp_path / "net.pt"
    torch.save(build(net[0]).model.state_dict(), state)
    rep = _json(["engine", "run", state, "--model", net[0], "--dataset", "fashion-mnist", "--samples", "8",
                 "--runs", "1", "--warmup", "0"], capsys)
    assert rep["calibration"] == "4 batches of fashion-mnist training images"
    assert rep["inputs"] == "8 fashion-mnist test images" and rep["bit_exact"] is True
    assert rep["input_shape"] == [1, 1, 28, 28]


@needs_mcu
@pytest.mark.slow
def test_mcu_is_bit_exact_under_qemu(net, capsys):
    rep = _json(["engine", "mcu", net, "--sample", "2"], capsys)
    assert rep["mcu_qemu_bitexact"] is True and rep["fits_256kb_sram_1mb_flash"] is True
    assert rep["mcu_flash_kb"] * 1024 > 8 * 14 * 14 * 10            # the linear layer's int8 weights alone
    assert rep["mcu_sram_kb"] * 1024 >= rep["arena_bytes"] > 0


def test_mcu_without_the_tool_chain_is_one_sentence(net, capsys, monkeypatch):
    from efficientml.engine import mcu

    monkeypatch.setattr(mcu.shutil, "which", lambda name: None)
    rc, _, err = _run(["engine", "mcu", net], capsys)
    assert rc == 2 and err.count("\n") == 1 and "apt-get install gcc-arm-none-eabi" in err
