"""The families we read and write, one :class:`~efficientml.llm.arch.family.Family` entry each.

Every family is Llama blocks with other options: Mistral may have a sliding window, Qwen2 has q/k/v
biases, Qwen3 q/k norms (which act on q_proj / k_proj outputs, so scaling their inputs still folds into
the input norm), Phi-3 stores q/k/v and gate/up fused and turns part of each head with (Long)RoPE,
Granite scales embeddings, attention scores, residual branches and logits; Mixtral and Qwen2-MoE have
Mixture-of-Experts feed-forward blocks (no scaling groups: compression refuses them). A new family is a new entry
here (and its tests), not code elsewhere.
"""

from __future__ import annotations

from efficientml.llm.arch.family import Family, FusedProjection, GGUFForm, ScalingGroup, register

# Llama's block: q/k/v share the attention norm, gate/up the MLP norm; v feeds o, up feeds down
LLAMA_GROUPS = (
    ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", prev_is_norm=False,
                 needs_same_width=True),
    ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScalingGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", prev_is_norm=False),
)
GRANITE_SCALARS = ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling")
_WINDOW = {"sliding_window": "attention.sliding_window"}

LLAMA = register(Family(
    "llama", "LlamaForCausalLM", "Llama", LLAMA_GROUPS, hf_keys=("attention_bias", "mlp_bias"),
    # llama.cpp's converter writes Mistral as llama; a file that says "mistral" reads as Llama + its window
    gguf=GGUFForm("llama", permute_qk=True, aliases={"mistral": _WINDOW})))

MISTRAL = register(Family(
    "mistral", "MistralForCausalLM", "Mistral", LLAMA_GROUPS, hf_keys=("sliding_window",),
    use_sliding_window=True,  # the window is off only where config.json says use_sliding_window: false
    gguf=GGUFForm("llama", reads=False, permute_qk=True)))

QWEN2 = register(Family(
    "qwen2", "Qwen2ForCausalLM", "Qwen2", LLAMA_GROUPS, defaults={"attention_bias": True},
    hf_keys=("sliding_window", "use_sliding_window"), use_sliding_window=False,
    gguf=GGUFForm("qwen2", qkv_bias=True)))  # qwen's GGUF keeps rotate-half Q/K rows

QWEN3 = register(Family(
    "qwen3", "Qwen3ForCausalLM", "Qwen3", LLAMA_GROUPS, fixed={"qk_norm": True}, allows=frozenset({"qk_norm"}),
    hf_keys=("attention_bias", "sliding_window", "use_sliding_window"), use_sliding_window=False,
    gguf=GGUFForm("qwen3", qkv_bias=True, qk_norm=True)))

# Phi-3 / Phi-3.5 / Phi-4-mini: q/k/v as one qkv_proj and gate/up as one gate_up_proj (split at load,
# fused again on save, in the HF checkpoint and in GGUF), RoPE on part of each head, LongRoPE
PHI3 = register(Family(
    "phi3", "Phi3ForCausalLM", "Phi-3", LLAMA_GROUPS, allows=frozenset({"partial_rotary_factor"}),
    hf_keys=("partial_rotary_factor", "sliding_window"),
    fused=(FusedProjection("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                           ("q", "kv", "kv"), gguf="attn_qkv"),
           FusedProjection("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"), ("ffn", "ffn"), gguf="ffn_up")),
    gguf=GGUFForm("phi3", rope_dim_is_rotary=True, longrope=True, rope_types=("default", "longrope"),
                  keys=_WINDOW)))

# IBM Granite 3.x: embeddings × embedding_multiplier, attention scores × attention_multiplier (instead
# of 1/sqrt(head dim)), both residual branches × residual_multiplier, logits ÷ logits_scaling
GRANITE = register(Family(
    "granite", "GraniteForCausalLM", "Granite", LLAMA_GROUPS,
    defaults={"attention_multiplier": 1.0},  # transformers' default when absent
    allows=frozenset(GRANITE_SCALARS), hf_keys=("attention_bias", "mlp_bias", *GRANITE_SCALARS),
    gguf=GGUFForm("granite", permute_qk=True, keys={  # llama.cpp's names (no attention scale: 1/sqrt(hd))
        "embedding_multiplier": "embedding_scale", "residual_multiplier": "residual_scale",
        "logits_scaling": "logit_scale", "attention_multiplier": "attention.scale"})))

# Mixture-of-Experts (efficientml.llm.moe): Mixtral's experts are the full intermediate_size, its top-k
# weights renormalized; its checkpoints name the block block_sparse_moe and each expert's w1/w3/w2
MIXTRAL = register(Family(
    "mixtral", "MixtralForCausalLM", "Mixtral", (), hf_keys=("sliding_window", "num_experts", "num_experts_per_tok"),
    defaults={"num_experts_per_tok": 2}, fixed={"norm_topk_prob": True, "moe_intermediate_size": None},
    allows=frozenset({"num_experts"}), use_sliding_window=True, hf_names={"num_experts": "num_local_experts"},
    weight_renames=(("block_sparse_moe.", "mlp."), (".w1.", ".gate_proj."), (".w3.", ".up_proj."),
                    (".w2.", ".down_proj."))))

# Qwen1.5-MoE / Qwen2-MoE: smaller experts (moe_intermediate_size), top-k weights as they are, and a
# shared expert behind a sigmoid gate; every layer sparse (decoder_sparse_step 1, no mlp_only_layers)
QWEN2_MOE = register(Family(
    "qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2-MoE", (),
    defaults={"attention_bias": True, "norm_topk_prob": False, "num_experts_per_tok": 4},
    allows=frozenset({"num_experts", "shared_expert_intermediate_size"}),
    hf_keys=("sliding_window", "use_sliding_window", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
             "shared_expert_intermediate_size", "norm_topk_prob"), use_sliding_window=False,
    hf_requires={"decoder_sparse_step": 1, "mlp_only_layers": []}))
