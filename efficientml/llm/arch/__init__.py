"""Model families as data: one :class:`Family` entry per Hugging Face ``model_type`` (llama, mistral,
qwen2, qwen3, phi3, granite), read by the config parser, both GGUF directions, the HF writer,
fused-name handling and the AWQ/SmoothQuant mappings.

    from efficientml.llm import arch
    arch.get("phi3").fused          # Phi-3's qkv_proj / gate_up_proj and how they split
    arch.by_gguf("granite")         # the family a GGUF file of that architecture reads as

Adding a family is one entry in :mod:`efficientml.llm.arch.families` (or :func:`register` at run time)
plus its tests. The lowest layer of ``efficientml.llm``: it imports nothing else from it.
"""

from efficientml.llm.arch.family import (FAMILY_FIELDS, FIELD_WHAT, HF_KEYS, ROW_WIDTHS, Family, FusedProjection,
                                         GGUFForm, ScalingGroup, by_gguf, entries, get, gguf_archs, names,
                                         register, unregister)
from efficientml.llm.arch.families import GRANITE_SCALARS, LLAMA_GROUPS

__all__ = ["FAMILY_FIELDS", "FIELD_WHAT", "GRANITE_SCALARS", "HF_KEYS", "LLAMA_GROUPS", "ROW_WIDTHS", "Family",
           "FusedProjection", "GGUFForm", "ScalingGroup", "by_gguf", "entries", "get", "gguf_archs", "names",
           "register", "unregister"]
