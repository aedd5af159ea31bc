"""Compressed checkpoints: a Hugging Face folder in the compressed-tensors layout (vLLM and
transformers load it), and our loader that runs it with the real quantized linears.

Layout of ``DIR/``::

    config.json                  HF config + "quantization_config" (compressed-tensors):
                                   W-only: format "pack-quantized", weights {num_bits, type: int,
                                   symmetric, strategy: group|channel, group_size}
                                   W8A8:   format "int-quantized", weights int8 channel-wise, symmetric;
                                   input_activations int8 symmetric, strategy token (dynamic) or tensor (static)
    model.safetensors            per quantized linear <name>.:
                                   weight_packed      int32 (out, ceil(in·b/32))  dense b-bit codes (packing.py)
                                   weight_scale       fp16 (out, in/group)        (per channel: (out, 1))
                                   weight_zero_point  int32 (ceil(out·b/32), G)   asymmetric only, packed along out
                                   weight_shape       int64 [out, in]
                                 W8A8: weight int8 (out, in), weight_scale fp32 (out, 1), input_scale (static)
                                 other tensors (embeddings, norms) as in a plain HF folder
    tokenizer.json, tokenizer_config.json, generation_config.json
    efficientml_compression.json the config that produced it, for reproducibility

Written to a temporary folder and renamed: an existing ``DIR`` is refused unless ``overwrite``.

Checked against the established readers (tests/llm/compress/test_checkpoint.py): compressed-tensors'
``PackedQuantizationCompressor.decompress`` gives our dequantized weights bit for bit, and
transformers' ``AutoModelForCausalLM.from_pretrained(DIR)`` reproduces our logits for symmetric
weights (transformers 5.x + compressed-tensors 0.20 refuse asymmetric ones, their own included: the
model they build on the meta device expects unpacked zero points).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from efficientml.core.errors import CheckpointError, UnsupportedError
from efficientml.core.modules import set_module
from efficientml.core.serialization import atomic_dir
from efficientml.llm.io.fused_compressed import fuse_compressed, fused_module_name, split_compressed
from efficientml.llm.kernels.qlinear import QuantLinear, W8A8Linear
from efficientml.quant.grid import weight_grid  # the LLM weight grid (import-only change)
from efficientml.llm.io.generation_config import generation_config


def _quant_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, W8A8Linear))}


def quantization_config(model: nn.Module) -> dict[str, Any]:
    mods = _quant_modules(model)
    if not mods:
        raise UnsupportedError("the model has no quantized linears to save; run quantize() with pack=True first")
    kinds = {type(m) for m in mods.values()}
    if len(kinds) > 1:
        raise UnsupportedError("a checkpoint mixing weight-only and W8A8 linears is not supported")
    first = next(iter(mods.values()))
    ignore = list(dict.fromkeys(fused_module_name(model.config, n) for n, m in model.named_modules()
                                if isinstance(m, nn.Linear)))
    if isinstance(first, QuantLinear):
        specs = {m.spec for m in mods.values()}
        if len(specs) > 1:
            raise UnsupportedError("all quantized linears of a checkpoint must share one bit width and group size")
        s = first.spec
        weights = {"num_bits": s.bits, "type": "int", "symmetric": s.symmetric,
                   "strategy": "group" if s.group_size else "channel", "group_size": s.group_size,
                   "dynamic": False, "observer": "minmax", "actorder": None}
        fmt, acts = "pack-quantized", None
    else:
        act = {m.act for m in mods.values()}
        if len(act) > 1:
            raise UnsupportedError("all W8A8 linears of a checkpoint must share one activation mode")
        weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None,
                   "dynamic": False, "observer": "minmax"}
        dyn = first.act == "dynamic"
        acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token" if dyn else "tensor",
                "dynamic": dyn, "observer": None if dyn else "minmax"}
        fmt = "int-quantized"
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": acts, "output_activations": None}},
            "ignore": sorted(ignore)}


def save_compressed(model: nn.Module, tokenizer, folder: str | Path, overwrite: bool = False,
                    float_dtype: torch.dtype | None = None, recipe: dict | None = None,
                    sampling: dict | None = None) -> Path:
    """Write ``model`` (with packed QuantLinear / W8A8Linear modules) as described in the module doc.
    ``float_dtype`` casts the unquantized float tensors (e.g. fp16 embeddings); scales keep theirs.
    ``sampling``: the model's sampling defaults, for generation_config.json."""
    from safetensors.torch import save_file

    cfg = model.config
    hf = cfg.to_hf_dict()
    hf["quantization_config"] = quantization_config(model)
    qnames = set(_quant_modules(model))
    state = {}
    for k, v in model.state_dict().items():
        if cfg.tie_word_embeddings and k == "lm_head.weight":
            continue
        t = v.detach().to("cpu")
        owner = k.rsplit(".", 1)[0]
        if float_dtype is not None and t.is_floating_point() and owner not in qnames:
            t = t.to(float_dtype)
        state[k] = t.contiguous()
    if float_dtype is not None:
        hf["torch_dtype"] = str(float_dtype).removeprefix("torch.")
    w = hf["quantization_config"]["config_groups"]["group_0"]["weights"]
    state = fuse_compressed(cfg, state, w["num_bits"])  # Phi-3: one qkv_proj / gate_up_proj
    gen = generation_config(cfg, sampling)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        (tmp / "efficientml_compression.json").write_text(json.dumps(recipe or {}, indent=2, default=str) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(folder)


def load_compressed(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer or None) from a folder written by :func:`save_compressed`; the quantized
    linears are real (QuantLinear / W8A8Linear), built on the meta device and assigned from the file."""
    from efficientml.llm.model import build_model

    folder = Path(folder)
    cfg, grp, fmt, state, st_path = _read_compressed(folder)
    model = build_model(cfg, "meta", dtype)
    qset = set(_quantized_modules(model, state, fmt, grp))
    for k, t in list(state.items()):
        if t.is_floating_point() and k.rsplit(".", 1)[0] not in qset:
            state[k] = t.to(dtype)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{str(st_path)!r} does not match its config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.tie_weights()
    model.to(device).eval()
    tok = None
    if (folder / "tokenizer.json").is_file():
        from efficientml.llm.io.tokenizer import Tokenizer

        tok = Tokenizer.from_folder(folder)
    return model, tok


def _read_compressed(folder: Path):
    """(config, the quantization config group, its format, the tensors with fused projections split,
    the safetensors path), each checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from efficientml.llm.config import LlamaConfig

    cfg_path, st_path = folder / "config.json", folder / "model.safetensors"
    if not cfg_path.is_file() or not st_path.is_file():
        raise CheckpointError(f"{str(folder)!r} is not a compressed checkpoint (config.json and model.safetensors expected)")
    hf = json.loads(cfg_path.read_text())
    qc = hf.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        raise CheckpointError(f"{str(cfg_path)!r} has no compressed-tensors quantization_config")
    fmt = qc.get("format")
    if fmt not in ("pack-quantized", "int-quantized"):
        raise UnsupportedError(f"compressed-tensors format {fmt!r} is not supported; expected pack-quantized or int-quantized")
    grp = next(iter(qc["config_groups"].values()))
    cfg = LlamaConfig.from_hf_dict({k: v for k, v in hf.items() if k != "quantization_config"}, source=str(cfg_path))
    try:
        state = load_file(str(st_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{str(st_path)!r} is truncated or not a safetensors file ({e})") from None
    state = split_compressed(cfg, state, int(grp["weights"]["num_bits"]), str(st_path))
    return cfg, grp, fmt, state, st_path


def _quantized_modules(model: nn.Module, state: dict[str, torch.Tensor], fmt: str, grp: dict) -> list[str]:
    """Swap in a meta QuantLinear / W8A8Linear for every quantized linear ``state`` holds; their names."""
    if fmt == "pack-quantized":
        w = grp["weights"]
        spec = weight_grid(int(w["num_bits"]), w.get("group_size") if w["strategy"] == "group" else None,
                               bool(w["symmetric"]))
        names = [k[: -len(".weight_packed")] for k in state if k.endswith(".weight_packed")]
        for n in names:
            out, inp = (int(x) for x in state[n + ".weight_shape"].tolist())
            set_module(model, n, QuantLinear(inp, out, spec, bias=(n + ".bias") in state, device="meta",
                                             scale_dtype=state[n + ".weight_scale"].dtype))
        return names
    act = "dynamic" if grp["input_activations"]["dynamic"] else "static"
    names = [k[: -len(".weight_scale")] for k in state if k.endswith(".weight_scale")]
    for n in names:
        out, inp = state[n + ".weight"].shape
        set_module(model, n, W8A8Linear(inp, out, bias=(n + ".bias") in state, act=act, device="meta"))
    return names
