"""Prompt and prefix tuning: virtual tokens initialised from real tokens give exactly the base model's
logits on (tokens + input); gradients reach only the virtual-token parameters; generation through the
KV cache equals the base model generating after the real tokens; peft's prompt/prefix tuning (on
transformers' Llama) gives the same logits from the same weights; saved state loads back exactly."""

import pytest
import torch

from efficientml import apply
from efficientml.core.errors import ConfigError
from efficientml.finetune import PrefixTuningConfig, PromptTuningConfig, load_trainable, save_trainable
from efficientml.finetune.sft import SFTConfig, token_loss, train_sft
from efficientml.llm.generate import SamplingConfig, generate

from ..llm.conftest import tiny_model

TOKENS = (5, 9, 11, 3)


def _ids(seed=2, T=12):
    return torch.randint(0, 128, (2, T), generator=torch.Generator().manual_seed(seed))


def _ref(base, ids):
    with torch.no_grad():
        return base(torch.cat([torch.tensor([TOKENS] * ids.shape[0]), ids], 1))[:, len(TOKENS):]


CONFIGS = [PromptTuningConfig(num_virtual_tokens=4, init="tokens", init_token_ids=TOKENS),
           PrefixTuningConfig(num_virtual_tokens=4, init="tokens", init_token_ids=TOKENS)]


@pytest.mark.parametrize("config", CONFIGS, ids=["prompt", "prefix"])
def test_virtual_tokens_from_real_tokens_equal_the_base_on_the_longer_input(config):
    base = tiny_model()
    model = apply(base, config).model
    with torch.no_grad():
        out = model(_ids())
    assert (out - _ref(base, _ids())).abs().max() <= 1e-5
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding on row 1: its real tokens still see the virtual ones
    with torch.no_grad():
        padded = model(_ids(), attention_mask=mask)
    assert (padded[0] - out[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("config", CONFIGS + [PrefixTuningConfig(num_virtual_tokens=3, projection=True)],
                         ids=["prompt", "prefix", "prefix-mlp"])
def test_gradients_reach_only_the_virtual_tokens_and_training_lowers_the_loss(config):
    model = apply(tiny_model(), config).model
    ids = _ids(T=16)
    loss, n = token_loss(model, ids, ids)
    loss.backward()
    grads = {k for k, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(k.startswith("virtual_tokens.") for k in grads)
    assert {k for k, p in model.named_parameters() if p.requires_grad} == grads
    before = loss.item() / n
    data = iter(lambda: (ids, ids), None)
    hist = train_sft(model, data, SFTConfig(lr=5e-2, steps=8, batch_size=2, warmup_frac=0.0,
                                            grad_checkpointing=isinstance(config, PrefixTuningConfig)),
                     progress=False)
    assert hist["curve"][-1]["loss"] < before - 0.05


@pytest.mark.parametrize("config", CONFIGS, ids=["prompt", "prefix"])
def test_generation_continues_after_the_virtual_tokens(config):
    base = tiny_model()
    model = apply(base, config).model
    prompt = _ids(T=6)[0].tolist()
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.0)
    ours = generate(model, prompt, cfg).tokens[0]
    theirs = generate(base, list(TOKENS) + prompt, cfg).tokens[0]
    assert ours == theirs
    cache = model.new_cache(1, 20)
    assert cache.length == 4 and cache.max_length == 24


@pytest.mark.parametrize("kind", ["prompt", "prefix", "prefix-mlp"])
def test_peft_virtual_tokens_give_equal_logits(tmp_path, kind):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    transformers = pytest.importorskip("transformers")
    from efficientml.llm.io.load import save_hf

    save_hf(tiny_model(), None, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32,
                                                       attn_implementation="sdpa")
    if kind == "prompt":
        pc, ours = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), PromptTuningConfig(3)
    else:
        mlp = kind == "prefix-mlp"
        pc = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=mlp,
                                     encoder_hidden_size=48)
        ours = PrefixTuningConfig(3, projection=mlp, encoder_hidden_size=48 if mlp else None)
    theirs = peft.get_peft_model(hf, pc).eval()
    model = apply(tiny_model(), ours).model
    own = dict(model.named_parameters())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                key = "virtual_tokens." + n.split("prompt_encoder.default.", 1)[1].replace("embedding.weight",
                                                                                           "embedding")
                own[key].copy_(p)
        ref, out = theirs(input_ids=_ids()).logits[:, -12:], model(_ids())
    assert (ref - out).abs().max() <= 1e-4


def test_save_load_and_errors(tmp_path):
    config = PrefixTuningConfig(num_virtual_tokens=3, projection=True)
    model = apply(tiny_model(), config).model
    save_trainable(model, tmp_path / "p", config)
    again, cfg = load_trainable(tiny_model(), tmp_path / "p")
    assert cfg == config
    with torch.no_grad():
        assert torch.equal(again(_ids()), model(_ids()))
    with pytest.raises(ConfigError, match="already has virtual tokens"):
        apply(model, PromptTuningConfig(2))
    with pytest.raises(ConfigError, match="init_token_ids of length"):
        PromptTuningConfig(num_virtual_tokens=3, init="tokens", init_token_ids=(1, 2))
    with pytest.raises(ConfigError, match="positive integer"):
        PrefixTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        apply(tiny_model(), PromptTuningConfig(num_virtual_tokens=1, init="tokens", init_token_ids=(500,)))


@pytest.mark.parametrize("config", [PromptTuningConfig(3), PrefixTuningConfig(3, projection=True)],
                         ids=["prompt", "prefix-mlp"])
def test_gradient_checkpointing_gives_the_same_gradients(config):
    from efficientml.finetune.sft import gradient_checkpointing

    model = apply(tiny_model(), config).model
    ids = _ids()
    token_loss(model, ids, ids)[0].backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with gradient_checkpointing(model):  # blocks recompute their forward, cache updates included
        token_loss(model, ids, ids)[0].backward()
    assert plain and all(torch.equal(p.grad, plain[n]) for n, p in model.named_parameters() if n in plain)


@pytest.mark.parametrize("kind", ["prompt", "prefix", "prefix-mlp"])
def test_peft_layout_round_trips_with_equal_logits(tmp_path, kind):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    transformers = pytest.importorskip("transformers")
    from efficientml.finetune.peft_prompt import load_prompt_adapter, save_prompt_adapter
    from efficientml.llm.io.load import save_hf

    save_hf(tiny_model(), None, tmp_path / "hf")
    config = {"prompt": PromptTuningConfig(3), "prefix": PrefixTuningConfig(3),
              "prefix-mlp": PrefixTuningConfig(3, projection=True)}[kind]
    model = apply(tiny_model(), config).model
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    save_prompt_adapter(model, tmp_path / "a", "tiny")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32,
                                                       attn_implementation="sdpa")
    theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "a")).eval()
    again, _ = load_prompt_adapter(tiny_model(), tmp_path / "a")
    with torch.no_grad():
        ref = model(_ids())
        assert (theirs(input_ids=_ids()).logits[:, -12:] - ref).abs().max() <= 1e-4
        assert (again(_ids()) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["prompt", "prefix", "prefix-mlp"])
def test_peft_made_prompt_or_prefix_loads_here(tmp_path, kind):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    transformers = pytest.importorskip("transformers")
    from efficientml.finetune.peft_prompt import load_prompt_adapter
    from efficientml.llm.io.load import save_hf

    save_hf(tiny_model(), None, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32,
                                                       attn_implementation="sdpa")
    pc = (peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3) if kind == "prompt" else
          peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=kind == "prefix-mlp"))
    made = peft.get_peft_model(hf, pc)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in made.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    made.save_pretrained(str(tmp_path / "p"))
    ours, config = load_prompt_adapter(tiny_model(), tmp_path / "p")
    assert config.num_virtual_tokens == 3
    with torch.no_grad():
        assert (made.eval()(input_ids=_ids()).logits[:, -12:] - ours(_ids())).abs().max() <= 1e-4
