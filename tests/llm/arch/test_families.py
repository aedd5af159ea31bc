"""Model families as data: every entry is consistent with the config, the GGUF reader/writer and the
compression code that read it; a family registered at run time (a copy of an existing one under a new
name) goes through config parsing, GGUF both ways, the HF writer and AWQ with the same numbers as the
family it copies; unknown families are refused with a message that says where to add one."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch

from efficientml.core.errors import ConfigError, UnsupportedError
from efficientml.llm import arch
from efficientml.llm.compress.mappings import BLOCK_LINEARS, scaling_groups
from efficientml.llm.config import LlamaConfig
from efficientml.llm.io.gguf import _LAYER_NAMES, layer_names
from efficientml.llm.model import build_model

from ..conftest import tiny_config

# what each family is written as in GGUF and whether its Q/K rows are interleaved (llama.cpp's converter)
GGUF_FORMS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
              "qwen3": ("qwen3", False), "phi3": ("phi3", False), "granite": ("granite", True)}
# a config each family's config.json can hold (its own options set)
OPTIONS = {"llama": {}, "mistral": {"sliding_window": 16}, "qwen2": {"attention_bias": True},
           "qwen3": {"qk_norm": True}, "phi3": {"partial_rotary_factor": 0.5, "sliding_window": 16},
           "granite": {"embedding_multiplier": 6.0, "attention_multiplier": 0.1, "residual_multiplier": 0.3,
                       "logits_scaling": 4.0},
           "mixtral": {"num_experts": 4, "num_experts_per_tok": 2},
           "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                         "shared_expert_intermediate_size": 32, "norm_topk_prob": False, "attention_bias": True}}
MOE = ("mixtral", "qwen2_moe")  # no GGUF form (GGUF reading and writing refuse them)
FIELDS = {f.name for f in dataclasses.fields(LlamaConfig)}


def test_the_eight_families_and_their_gguf_forms():
    assert arch.names() == [*GGUF_FORMS, *MOE]
    assert {f.model_type: (f.gguf.arch, f.gguf.permute_qk) for f in arch.entries() if f.gguf} == GGUF_FORMS
    assert all(arch.get(m).gguf is None and not arch.get(m).scaling_groups for m in MOE)
    table = arch.gguf_archs()  # every GGUF name read by exactly one family; mistral files read as llama
    assert {a: f.model_type for a, (f, _) in table.items()} == {
        "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
        "granite": "granite"}
    assert dict(table["mistral"][1]) == {"sliding_window": "attention.sliding_window"}


@pytest.mark.parametrize("fam", arch.entries(), ids=lambda f: f.model_type)
def test_every_entry_is_consistent(fam):
    assert arch.get(fam.model_type) is fam and fam.hf_class.endswith("ForCausalLM")
    assert set(fam.defaults) | set(fam.fixed) <= FIELDS
    assert set(fam.fixed) & set(arch.FAMILY_FIELDS) <= set(fam.allows)  # a fixed family-only field is allowed
    assert set(fam.allows) <= set(arch.FAMILY_FIELDS) and set(fam.hf_keys) <= set(arch.HF_KEYS)
    assert set(fam.allows) - {"qk_norm"} <= set(fam.hf_keys)  # what it allows, its config.json holds
    for g in fam.scaling_groups:  # groups name real linears of a Llama block
        assert set(g.linears) <= set(BLOCK_LINEARS)
        assert g.prev in BLOCK_LINEARS if not g.prev_is_norm else g.prev.endswith("layernorm")
    cfg = tiny_config(model_type=fam.model_type, head_dim=16, **OPTIONS[fam.model_type])
    for f in fam.fused:  # parts are our linears; rows add up to the fused linear's
        assert set(f.parts) <= set(BLOCK_LINEARS) and len(f.parts) == len(f.widths)
        assert sum(f.rows(cfg)) == sum(build_model(cfg, "meta").model.layers[0].get_submodule(p).out_features
                                       for p in f.parts)
    if fam.gguf is not None:
        names = layer_names(fam)  # GGUF names: one per tensor of ours or a fused one
        assert len(set(names.values())) == len(names) and set(_LAYER_NAMES) <= set(names)
        assert set(fam.gguf.keys) <= FIELDS and fam.gguf.arch in arch.gguf_archs()
    # config.json both ways: the family's options survive exactly
    back = LlamaConfig.from_hf_dict(cfg.to_hf_dict())
    assert back == cfg and back.to_hf_dict()["architectures"] == [fam.hf_class]


def test_options_of_other_families_are_refused_in_config_json():
    for mt, options in OPTIONS.items():
        for other, fam in ((o, arch.get(o)) for o in OPTIONS if o != mt):
            mine = {k: v for k, v in options.items() if k in arch.FAMILY_FIELDS and k not in fam.allows}
            if mine:
                with pytest.raises(UnsupportedError, match="no Hugging Face config.json equivalent"):
                    tiny_config(model_type=other, **mine).to_hf_dict()
    with pytest.raises(UnsupportedError, match="Qwen3 implies qk_norm=True"):
        tiny_config(model_type="qwen3").to_hf_dict()


def test_unknown_families_say_where_to_add_an_entry(tmp_path):
    from efficientml.llm.io.gguf_write import gguf_name

    with pytest.raises(UnsupportedError, match=r"model_type 'falcon' .*/llm/arch/families.py"):
        LlamaConfig.from_hf_dict({"model_type": "falcon", "architectures": ["FalconForCausalLM"]})
    with pytest.raises(UnsupportedError, match=r"GGUF architecture 'falcon' .*/llm/arch/families.py"):
        gguf_name("model.layers.0.self_attn.q_proj.weight", "falcon")
    m = torch.nn.Module()
    m.config = types.SimpleNamespace(model_type="falcon")
    with pytest.raises(UnsupportedError, match="no scaling-group mapping.*llm/arch/families.py"):
        scaling_groups(m)
    with pytest.raises(ConfigError, match="already registered"):
        arch.register(arch.get("llama"))


# --- a family added at run time ------------------------------------------------------------------

def _copy(base: str, name: str) -> arch.Family:
    fam = arch.get(base)
    return dataclasses.replace(fam, model_type=name, hf_class=f"{name.title()}ForCausalLM", display=name.title(),
                               gguf=dataclasses.replace(fam.gguf, arch=name, aliases={}))


@pytest.fixture(params=["llama", "phi3"])
def new_family(request):
    """A copy of llama (Q/K rows permuted in GGUF) or of phi3 (fused projections) under a new name."""
    base = request.param
    fam = arch.register(_copy(base, f"my{base}"))
    yield base, fam
    arch.unregister(fam.model_type)


def _tokenizer(tmp_path, write_tokenizer_gguf, vocab: int):
    from efficientml.llm.io.gguf import GGUFFile
    from efficientml.llm.io.tokenizer import Tokenizer

    tokens = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(vocab - 3)]
    write_tokenizer_gguf(tmp_path / "tok.gguf", "llama", tokens, [2, 3, 3] + [1] * (vocab - 3),
                         scores=[0.0] * vocab, bos=1, eos=2)
    return Tokenizer.from_gguf(GGUFFile(tmp_path / "tok.gguf"))


def test_a_registered_family_runs_end_to_end(new_family, tmp_path, write_tokenizer_gguf, ids, calib):
    from efficientml import apply
    from efficientml.llm.compress import AWQConfig, load_compressed, save_compressed
    from efficientml.llm.io.gguf import GGUFFile
    from efficientml.llm.io.gguf_write import save_gguf
    from efficientml.llm.io.load import load_gguf, load_hf, save_hf

    base, fam = new_family
    ref_cfg = tiny_config(model_type=base, head_dim=16, tie_word_embeddings=False, **({"partial_rotary_factor": 0.5}
                                                                         if base == "phi3" else {}))
    conf = ref_cfg.to_hf_dict() | {"model_type": fam.model_type, "architectures": [fam.hf_class]}
    cfg = LlamaConfig.from_hf_dict(conf)  # config parsing
    assert cfg == dataclasses.replace(ref_cfg, model_type=fam.model_type) and cfg.family is fam
    torch.manual_seed(0)
    m = build_model(cfg, "cpu").eval()
    ref = build_model(ref_cfg, "cpu").eval()
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        want = ref(ids)
        assert torch.equal(m(ids), want)

    tok = _tokenizer(tmp_path, write_tokenizer_gguf, cfg.vocab_size)
    path = save_gguf(m, tok, tmp_path / "new.gguf", outtype="f32")  # GGUF write → read
    gf = GGUFFile(path)
    assert gf.arch == fam.model_type and gf.config.model_type == fam.model_type
    assert ("blk.0.attn_qkv.weight" in {t.name for t in gf.infos}) == (base == "phi3")
    back = load_gguf(gf)
    out = save_hf(back, None, tmp_path / "hf")  # HF save → load
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == fam.model_type and saved["architectures"] == [fam.hf_class]
    again = load_hf(out)
    with torch.no_grad():
        assert torch.equal(back(ids), want) and torch.equal(again(ids), want)

    assert scaling_groups(m) == arch.get(base).scaling_groups  # compression: the same AWQ as its base
    for model in (m, ref):
        apply(model, AWQConfig(4, 32, n_grid=4, clip_grid=4), calib=calib, inplace=True, progress=False)
    save_compressed(m, None, tmp_path / "awq")
    q, _ = load_compressed(tmp_path / "awq")
    with torch.no_grad():
        qref = ref(ids)
        assert torch.equal(m(ids), qref) and torch.equal(q(ids), qref)
