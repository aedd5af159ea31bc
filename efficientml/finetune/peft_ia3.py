"""IA3 vectors in PEFT's layout (``adapter_config.json`` with ``peft_type: "IA3"`` +
``adapter_model.safetensors``), so ``peft.PeftModel.from_pretrained`` loads ours and peft's load here.

PEFT keys a vector as ``base_model.model.<module>.ia3_l`` with the shapes we keep ((out, 1), or
(1, in) for the feed-forward layers). ``target_modules`` / ``feedforward_modules`` are written as the
leaf names of the adapted layers; the metadata records the base model's shape, as LoRA's does.

    save_ia3_adapter(model, "out/ia3", IA3Config(), base_model="HuggingFaceTB/SmolLM2-135M")
    model, config = load_ia3_adapter(base, "out/ia3")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.nn as nn

from efficientml.core.errors import ConfigError, UnsupportedError
from efficientml.core.serialization import atomic_dir, load_state_dict, read_metadata, save_state_dict
from efficientml.core.transform import apply
from efficientml.finetune.ia3 import IA3Config, ia3_layers
from efficientml.finetune.method_io import load_trainable_state_dict
from efficientml.finetune.peft_io import CONFIG_FILE, PREFIX, WEIGHTS_FILE, base_signature, read_peft_config


def save_ia3_adapter(model: nn.Module, folder: str | os.PathLike, config: IA3Config, base_model: str | None = None,
                     overwrite: bool = False) -> Path:
    layers = ia3_layers(model)
    if not layers:
        raise ConfigError("the model has no IA3 vectors to save; apply an IA3Config first")
    if any(m.merged for _, m in layers):
        raise ConfigError("the IA3 vectors are merged into the weights; unmerge_ia3(model) before saving them")
    leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in layers})
    ff = sorted({n.rsplit(".", 1)[-1] for n, m in layers if m.feedforward})
    pc = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
          "target_modules": leaves, "feedforward_modules": ff, "fan_in_fan_out": False, "init_ia3_weights": True,
          "modules_to_save": None, "inference_mode": True, "exclude_modules": None}
    state = {f"{PREFIX}{n}.ia3_l": m.ia3_l.detach().float().contiguous() for n, m in layers}
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(pc, indent=2) + "\n")
        save_state_dict(tmp / WEIGHTS_FILE, state,
                        metadata={"format": "pt", "efficientml.base": json.dumps(base_signature(model))})
    return Path(folder)


def _read(folder: Path) -> dict:
    pc = read_peft_config(folder, ("IA3",))
    if pc.get("modules_to_save") or pc.get("fan_in_fan_out") or isinstance(pc.get("target_modules"), str):
        raise UnsupportedError(f"{str(folder)!r} uses modules_to_save, fan_in_fan_out or a regex target_modules, "
                               "which efficientml's IA3 does not read; expected a list of layer names")
    return pc


def load_ia3_adapter(model: nn.Module, folder: str | os.PathLike, inplace: bool = True) -> tuple[nn.Module, IA3Config]:
    """Put the IA3 adapter saved in ``folder`` (by us or by PEFT) onto ``model``."""
    folder = Path(folder)
    pc = _read(folder)
    want = json.loads(read_metadata(folder / WEIGHTS_FILE).get("efficientml.base", "{}"))
    have = base_signature(model)
    diff = {k: (v, have.get(k)) for k, v in want.items() if k in have and have[k] != v}
    if diff:
        raise ConfigError(f"adapter {str(folder)!r} was made for another base model: (adapter, this model) "
                          f"differ in {diff}")
    config = IA3Config(target_modules=tuple(sorted(pc["target_modules"])),  # PEFT writes sets: any order
                       feedforward_modules=tuple(sorted(pc.get("feedforward_modules") or ())))
    model = apply(model, config, inplace=inplace).model
    state = {k.removeprefix(PREFIX).replace(".default", ""): v
             for k, v in load_state_dict(folder / WEIGHTS_FILE).items()}
    load_trainable_state_dict(model, state, where=f"adapter {str(folder)!r}")
    return model, config
