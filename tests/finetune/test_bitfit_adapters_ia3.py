"""BitFit, bottleneck adapters and IA3: exactly the base model at init, gradients only where they
should be, exact trainable counts, IA3 merged into the weights exactly and equal to peft's IA3, and
saved/loaded trainable state that reproduces the outputs bit for bit."""

import pytest
import torch

from efficientml import apply
from efficientml.core.errors import ConfigError
from efficientml.finetune import (AdapterConfig, BitFitConfig, IA3Config, load_trainable, merge_ia3, save_trainable,
                                  trainable_parameters, unmerge_ia3)
from efficientml.finetune.ia3 import ia3_layers

from ..llm.conftest import tiny_model


def _ids(seed=2):
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))


def _perturb(model, seed=4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _grads(model):
    model(_ids()).logsumexp(-1).mean().backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


def test_bitfit_on_a_bias_free_llama_is_an_error_unless_biases_are_added(tmp_path):
    with pytest.raises(ConfigError, match="no bias parameters.*add_bias=True"):
        apply(tiny_model(), BitFitConfig())
    base = tiny_model()
    model = apply(base, BitFitConfig(add_bias=True)).model
    with torch.no_grad():
        assert torch.equal(model(_ids()), base(_ids()))  # zero biases change nothing
    # 2 blocks × (q 64 + k 32 + v 32 + o 64 + gate 128 + up 128 + down 64)
    assert trainable_parameters(model)["trainable"] == 2 * 512
    assert all(n.endswith(".bias") for n in _grads(model))
    _perturb(model)
    save_trainable(model, tmp_path / "b", BitFitConfig(add_bias=True))
    again, cfg = load_trainable(tiny_model(), tmp_path / "b")
    assert cfg == BitFitConfig(add_bias=True)
    with torch.no_grad():
        assert torch.equal(again(_ids()), model(_ids()))


def test_bitfit_trains_real_biases_only():
    base = tiny_model(attention_bias=True)  # Qwen2-style q/k/v biases
    model = apply(base, BitFitConfig()).model
    assert trainable_parameters(model)["trainable"] == 2 * (64 + 32 + 32)
    assert _grads(model) == {f"model.layers.{i}.self_attn.{p}_proj.bias" for i in (0, 1) for p in "qkv"}
    with pytest.raises(ConfigError, match="none of its biases match"):
        apply(base, BitFitConfig(patterns=("*.mlp.*",)))


@pytest.mark.parametrize("style,sites", [("houlsby", ("o_proj", "down_proj")), ("pfeiffer", ("down_proj",))])
def test_adapters_start_exactly_as_the_base(style, sites, tmp_path):
    base = tiny_model()
    config = AdapterConfig(style=style, reduction_factor=8)
    result = apply(base, config)
    model = result.model
    assert sorted(result.layers) == sorted(f"model.layers.{i}.{'self_attn' if s == 'o_proj' else 'mlp'}.{s}"
                                           for i in (0, 1) for s in sites)
    with torch.no_grad():
        assert torch.equal(model(_ids()), base(_ids()))  # W_up = 0: exactly the base model
    # per site: down 64→8 (+8 bias), up 8→64 (+64 bias)
    assert trainable_parameters(model)["trainable"] == 2 * len(sites) * (64 * 8 + 8 + 8 * 64 + 64)
    grads = _grads(model)
    assert grads and all(".adapter_" in n for n in grads)
    _perturb(model)
    with torch.no_grad():
        assert (model(_ids()) - base(_ids())).abs().max() > 1e-3
    save_trainable(model, tmp_path / "a", config)
    again, _ = load_trainable(tiny_model(), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(again(_ids()), model(_ids()))


def test_houlsby_can_train_the_norms_too():
    plain = trainable_parameters(apply(tiny_model(), AdapterConfig(reduction_factor=8)).model)["trainable"]
    model = apply(tiny_model(), AdapterConfig(reduction_factor=8, train_norms=True)).model
    # 2 blocks × (input + post-attention RMSNorm) + the final norm, 64 each
    assert trainable_parameters(model)["trainable"] == plain + (2 * 2 + 1) * 64
    assert {n for n in _grads(model) if "adapter_" not in n} == \
        {f"model.layers.{i}.{k}.weight" for i in (0, 1) for k in ("input_layernorm", "post_attention_layernorm")} \
        | {"model.norm.weight"}


def test_adapter_errors():
    with pytest.raises(ConfigError, match="style must be one of"):
        AdapterConfig(style="lora")
    with pytest.raises(ConfigError, match="leaves no bottleneck"):
        apply(tiny_model(), AdapterConfig(reduction_factor=128))
    with pytest.raises(ConfigError, match="placement must be"):
        AdapterConfig(placement=("ffn",))


def test_ia3_is_identity_at_init_and_merges_exactly(tmp_path):
    base = tiny_model()
    model = apply(base, IA3Config()).model
    with torch.no_grad():
        assert torch.equal(model(_ids()), base(_ids()))  # vectors of ones
    # k, v scale their 32 outputs, down_proj its 128 inputs, 2 blocks
    assert trainable_parameters(model)["trainable"] == 2 * (32 + 32 + 128)
    assert all(".ia3_l" in n for n in _grads(model))
    _perturb(model)
    before = {n: m.base_layer.weight.clone() for n, m in ia3_layers(model)}
    with torch.no_grad():
        ref = model(_ids())
        merge_ia3(model)
        assert (model(_ids()) - ref).abs().max() <= 1e-5
        unmerge_ia3(model)
        assert (model(_ids()) - ref).abs().max() <= 1e-5
        assert all((m.base_layer.weight - before[n]).abs().max() <= 1e-6 for n, m in ia3_layers(model))
    save_trainable(model, tmp_path / "i", IA3Config())
    again, _ = load_trainable(tiny_model(), tmp_path / "i")
    with torch.no_grad():
        assert torch.equal(again(_ids()), ref)
        plain = merge_ia3(again, unload=True)
        assert not ia3_layers(plain) and (plain(_ids()) - ref).abs().max() <= 1e-5
    with pytest.raises(ConfigError, match="another base model"):
        load_trainable(tiny_model(hidden_size=32, intermediate_size=64), tmp_path / "i")


def test_ia3_equals_peft(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    transformers = pytest.importorskip("transformers")
    from efficientml.llm.io.load import save_hf

    save_hf(tiny_model(), None, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32,
                                                       attn_implementation="sdpa")
    theirs = peft.get_peft_model(hf, peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                    feedforward_modules=["down_proj"])).eval()
    ours = apply(tiny_model(), IA3Config()).model
    g = torch.Generator().manual_seed(9)
    own = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
                key = n.removeprefix("base_model.model.").replace(".default", "")
                assert own[key].shape == p.shape  # PEFT's (out, 1) / (1, in) layout
                own[key].copy_(p)
        assert (theirs(_ids()).logits - ours(_ids())).abs().max() <= 1e-4


@pytest.mark.parametrize("direction", ["ours_in_peft", "peft_in_ours"])
def test_ia3_adapter_in_peft_layout_round_trips_with_equal_logits(tmp_path, direction):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    transformers = pytest.importorskip("transformers")
    from efficientml.finetune.peft_ia3 import load_ia3_adapter, save_ia3_adapter
    from efficientml.llm.io.load import save_hf

    save_hf(tiny_model(), None, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32,
                                                       attn_implementation="sdpa")
    if direction == "ours_in_peft":
        ours = apply(tiny_model(), IA3Config()).model
        _perturb(ours)
        save_ia3_adapter(ours, tmp_path / "a", IA3Config(), "tiny")
        theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "a")).eval()
        assert sum(1 for n, _ in theirs.named_parameters() if "ia3_l" in n) == 6
    else:
        theirs = peft.get_peft_model(hf, peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                        feedforward_modules=["down_proj"]))
        _perturb(theirs)
        theirs.save_pretrained(str(tmp_path / "a"))
        ours, cfg = load_ia3_adapter(tiny_model(), tmp_path / "a")
        assert cfg == IA3Config(target_modules=("down_proj", "k_proj"), feedforward_modules=("down_proj",))
    with torch.no_grad():
        assert (theirs.eval()(_ids()).logits - ours(_ids())).abs().max() <= 1e-4
        assert (ours(_ids()) - tiny_model()(_ids())).abs().max() > 1e-3  # the vectors are not all ones
