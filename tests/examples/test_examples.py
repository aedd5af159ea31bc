"""Every recipe in examples/ runs, in a quick setting, and gives the numbers it should."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, *argv: str) -> dict:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(list(argv))


def test_compress_cnn(capsys):
    row = run_example("compress_cnn", "--ratio", "0.3")
    assert row["params"] == (269_722, 133_643)              # channel surgery really removes weights
    assert row["macs"] == (40_551_040, 19_810_242)          # counted by analysis.count_macs
    c = row["correct_of_20"]
    assert c["fp32"] == 20                                  # the pretrained model on the 20 samples
    assert abs(c["pruned_int8"] - c["pruned"]) <= 1         # int8 keeps the pruned model's predictions
    assert row["int8_weight_bytes"] * 3.5 < row["pruned_fp32_bytes"]
    assert "MACs 40,551,040 → 19,810,242" in capsys.readouterr().out


def test_quantize_llm_and_chat():
    pytest.importorskip("tokenizers")
    out = run_example("quantize_llm_and_chat", "--method", "rtn", "--max-new-tokens", "12")
    # imported after the example: importing llm.kernels.qlinear before llm.compress hits an import
    # cycle (qlinear → llm.compress.rtn → awq → qlinear) that the layering work removes
    from efficientml.llm.kernels.qlinear import QuantLinear

    packed = [m for m in out["model"].modules() if isinstance(m, QuantLinear)]
    assert len(packed) == 30 * 7                           # every q/k/v/o/gate/up/down of the 30 blocks
    assert all(m.spec.bits == 4 and m.spec.group_size == 64 for m in packed)
    assert out["folder_bytes"] < 0.25 * 538e6              # fp32 SmolLM2-135M is 538 MB
    assert "Paris" in out["reply"]                         # greedy answer of the packed model


def test_prune_llm():
    pytest.importorskip("tokenizers")
    out = run_example("prune_llm", "--n-m", "2:4", "--calib-samples", "2", "--windows", "2")
    assert 0.5 <= out["sparsity"] < 0.5005                 # 2 of every 4 weights (plus any zeros already there)
    assert out["ppl_dense"] == pytest.approx(26.987, abs=5e-3)  # = llm_compression --quick's fp row
    assert out["ppl_dense"] < out["ppl_pruned"] < 10 * out["ppl_dense"]
