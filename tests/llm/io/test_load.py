"""Hugging Face folders: sharded checkpoints, bad input (unknown architecture, truncated safetensors),
atomic saving (an existing folder is refused, a failed save leaves nothing)."""

from __future__ import annotations

import json

import pytest
import torch

from efficientml.core.errors import CheckpointError, ConfigError, DataNotFoundError, UnsupportedError
from efficientml.llm.config import LlamaConfig
from efficientml.llm.io.load import load_hf, save_hf
from efficientml.llm.io.source import resolve_source
from efficientml.llm.model import build_model, init_weights

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)


@pytest.fixture()
def saved(tmp_path):
    m = build_model(CFG, device="cpu")
    init_weights(m, seed=3)
    save_hf(m, None, tmp_path / "m")
    return m, tmp_path / "m"


def test_sharded_index(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    m, folder = saved
    sd = load_file(str(folder / "model.safetensors"))
    shard = tmp_path / "sharded"
    shard.mkdir()
    (shard / "config.json").write_text((folder / "config.json").read_text())
    keys = sorted(sd)
    parts = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
             "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for fname, ks in parts.items():
        save_file({k: sd[k] for k in ks}, str(shard / fname))
        weight_map.update({k: fname for k in ks})
    (shard / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = load_hf(shard)
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_bf16_load_and_meta_free(saved):
    _, folder = saved
    m = load_hf(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in m.parameters())


def test_unknown_architecture(saved):
    _, folder = saved
    conf = json.loads((folder / "config.json").read_text())
    conf["model_type"] = "gpt_neox"
    conf["architectures"] = ["GPTNeoXForCausalLM"]
    (folder / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UnsupportedError, match="gpt_neox"):
        load_hf(folder)


def test_truncated_safetensors(saved):
    _, folder = saved
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_hf(folder)
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        load_hf(folder)


def test_missing_tensor(saved):
    from safetensors.torch import load_file, save_file

    _, folder = saved
    sd = load_file(str(folder / "model.safetensors"))
    sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="up_proj"):
        load_hf(folder)


def test_save_is_atomic(saved, tmp_path, monkeypatch):
    m, folder = saved
    with pytest.raises(ConfigError, match="already exists"):
        save_hf(m, None, folder)
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        save_hf(m, None, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".new")] == []


def test_unknown_source():
    with pytest.raises(DataNotFoundError, match="built-in"):
        resolve_source("no-such-model-xyz")


def test_generation_config_stop_tokens_join_eos(saved):
    folder = saved[1]
    gc = folder / "generation_config.json"
    gc.write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 7, 9]}))
    assert load_hf(folder).config.eos_token_ids == [2, 7, 9]  # Llama-3 style: <|end_of_text|>, <|eot_id|>, …
    from efficientml.llm.io.load import load_config

    assert load_config(folder).eos_token_ids == [2, 7, 9]  # the same config wherever it is read
    gc.write_text("{not json")
    assert load_hf(folder).config.eos_token_ids == [2]


def _bin_folder(saved, tmp_path, shards: int = 1):
    """The saved model as PyTorch pickles (as older Hub repos ship it), sharded with an index if asked."""
    m, folder = saved
    out = tmp_path / f"bin{shards}"
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    sd = {k: v.clone() for k, v in m.state_dict().items() if k != "lm_head.weight"}
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old transformers saved this buffer
    if shards == 1:
        torch.save(sd, out / "pytorch_model.bin")
        return m, out
    keys, weight_map = sorted(sd), {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = keys[i::shards]
        torch.save({k: sd[k] for k in part}, out / name)
        weight_map.update({k: name for k in part})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return m, out


@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_bin_weights(saved, tmp_path, shards):
    m, out = _bin_folder(saved, tmp_path, shards)
    loaded = load_hf(out)
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_safetensors_win_over_bin(saved, tmp_path):
    m, out = _bin_folder(saved, tmp_path)
    from safetensors.torch import save_file

    other = build_model(CFG, device="cpu")
    init_weights(other, seed=11)
    save_file({k: v for k, v in other.state_dict().items() if k != "lm_head.weight"}, str(out / "model.safetensors"))
    assert torch.equal(load_hf(out).model.norm.weight, other.model.norm.weight)
    assert torch.equal(load_hf(out).model.layers[0].mlp.down_proj.weight, other.model.layers[0].mlp.down_proj.weight)


class _NotATensor:
    def __reduce__(self):
        return (print, ("a pickle that runs code",))


def test_bad_pytorch_bin(saved, tmp_path):
    _, out = _bin_folder(saved, tmp_path)
    good = (out / "pytorch_model.bin").read_bytes()
    (out / "pytorch_model.bin").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated, not a PyTorch checkpoint"):
        load_hf(out)
    torch.save({"model.norm.weight": _NotATensor()}, out / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="holds more than tensors"):
        load_hf(out)
    torch.save([torch.ones(2)], out / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a state dict of named tensors"):
        load_hf(out)
    (out / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match=r"no weights: expected \*.safetensors \(or pytorch_model\*.bin\)"):
        load_hf(out)


def test_checkpoint_dtype(saved, tmp_path):
    """dtype="auto": config.json's torch_dtype (transformers 5 writes "dtype"), float32 when absent."""
    from efficientml.llm.io.load import checkpoint_dtype

    m, folder = saved
    assert checkpoint_dtype(folder) == torch.float32
    assert checkpoint_dtype(save_hf(m, None, tmp_path / "bf16", dtype=torch.bfloat16)) == torch.bfloat16
    conf = json.loads((folder / "config.json").read_text())
    conf.pop("torch_dtype")
    (folder / "config.json").write_text(json.dumps({**conf, "dtype": "float16"}))
    assert checkpoint_dtype(folder) == torch.float16
    (folder / "config.json").write_text(json.dumps(conf))
    assert checkpoint_dtype(folder) == torch.float32


def test_info_names_the_weight_files(saved, tmp_path):
    from efficientml.cli.llm import _storage

    _, out = _bin_folder(saved, tmp_path, shards=3)
    assert _storage(out).startswith("3 bin file(s)")
    assert _storage(saved[1]).startswith("1 safetensors file(s)")
