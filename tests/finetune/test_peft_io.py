"""Adapters in PEFT's layout: ours round-trip exactly; peft (with transformers' Llama) loads ours with
equal logits, and peft-made adapters load here with equal logits — LoRA, DoRA, rsLoRA, a layer subset."""

import json

import pytest
import torch

from efficientml import apply
from efficientml.core.errors import ConfigError, DataNotFoundError
from efficientml.finetune import LoRAConfig, adapters
from efficientml.finetune.peft_io import load_adapter, save_adapter
from efficientml.llm.io.load import save_hf

from ..llm.conftest import tiny_model


def _ids():
    return torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(5))


def _randomize(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=g))


def _trained(config, filter=None):
    model = apply(tiny_model(), config, filter=filter).model
    _randomize(model)
    return model


def test_roundtrip_is_exact_and_keys_are_peft(tmp_path):
    model = _trained(LoRAConfig(rank=4, alpha=8, dora=True))
    save_adapter(model, tmp_path / "a", model_config := LoRAConfig(rank=4, alpha=8, dora=True), "tiny")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector" in keys
    assert len(keys) == 2 * 7 * 3
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(model_config.target_modules) and cfg["use_dora"] is True
    again, config = load_adapter(tiny_model(), tmp_path / "a")
    assert config.to_dict() | {"target_modules": None} == model_config.to_dict() | {"target_modules": None}
    assert sorted(config.target_modules) == sorted(model_config.target_modules)
    with torch.no_grad():
        assert torch.equal(again(_ids()), model(_ids()))
    with pytest.raises(ConfigError, match="already exists"):
        save_adapter(model, tmp_path / "a", model_config)


def test_clear_errors(tmp_path):
    model = _trained(LoRAConfig(rank=4))
    save_adapter(model, tmp_path / "a", LoRAConfig(rank=4))
    with pytest.raises(ConfigError, match="made for another base model"):
        load_adapter(tiny_model(hidden_size=32, intermediate_size=64), tmp_path / "a")
    with pytest.raises(DataNotFoundError, match="adapter_config.json is missing"):
        load_adapter(tiny_model(), tmp_path)


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny") / "hf"
    save_hf(tiny_model(), None, folder)

    def build():
        return transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                            attn_implementation="sdpa").eval()
    return build


CASES = [(LoRAConfig(rank=4, alpha=8), None), (LoRAConfig(rank=4, alpha=8, dora=True), None),
         (LoRAConfig(rank=8, alpha=4, rslora=True, target_modules=("q_proj", "v_proj")), None),
         (LoRAConfig(rank=2), "model.layers.1.mlp.*")]


@pytest.mark.parametrize("config,filter", CASES)
def test_peft_loads_ours_with_equal_logits(tmp_path, hf_tiny, config, filter):
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install --no-deps peft accelerate)")
    model = _trained(config, filter)
    save_adapter(model, tmp_path / "a", config, "tiny")
    theirs = peft.PeftModel.from_pretrained(hf_tiny(), str(tmp_path / "a")).eval()
    n_theirs = sum(1 for n, _ in theirs.named_modules() if n.endswith(".lora_A"))
    assert n_theirs == len(adapters(model))
    with torch.no_grad():
        ref, ours = theirs(_ids()).logits, model(_ids())
    assert (ref - ours).abs().max() <= 1e-4


@pytest.mark.parametrize("dora", [False, True])
def test_peft_made_adapter_loads_here(tmp_path, hf_tiny, dora):
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install --no-deps peft accelerate)")
    pc = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"], use_dora=dora,
                         use_rslora=True)
    theirs = peft.get_peft_model(hf_tiny(), pc)
    _randomize(theirs, seed=7)
    theirs.save_pretrained(str(tmp_path / "p"))
    model, config = load_adapter(tiny_model(), tmp_path / "p")
    assert (config.rank, config.alpha, config.rslora, config.dora) == (4, 16.0, True, dora)
    with torch.no_grad():
        ref, ours = theirs.eval()(_ids()).logits, model(_ids())
    assert (ref - ours).abs().max() <= 1e-4
