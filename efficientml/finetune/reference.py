"""The reference model of DPO without a second copy of the weights, and reference log-probabilities
computed once (trl #3985: never recompute them).

- :func:`adapters_disabled`: within the block every :class:`LoRALinear` is replaced by its frozen
  ``base_layer`` (the same module object, so the computation is the base model's, bit for bit); they
  are put back on exit, even after an error.
- :class:`ReferenceLogprobs`: the reference's sequence log-probabilities of every pair (chosen,
  rejected), saved as safetensors with the data's fingerprint; loading them for other data is refused.

    ref = ReferenceLogprobs.compute(model, prefs)           # adapters off, one pass over the pairs
    ref.save("ref.safetensors"); ref = ReferenceLogprobs.load("ref.safetensors", prefs)
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

from efficientml.core.errors import CheckpointError, ConfigError
from efficientml.core.modules import set_module
from efficientml.finetune.inject import adapters
from efficientml.finetune.preference import PreferenceSet
from efficientml.finetune.sft_data import IGNORE


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` computing as its base: every LoRA layer swapped for its base layer for the block."""
    found = adapters(model)
    if not found:
        raise ConfigError("adapters_disabled needs a model with LoRA adapters (apply a LoRAConfig or "
                          "QLoRAConfig); for full fine-tuning pass a frozen reference model or "
                          "precomputed reference log-probabilities")
    merged = [n for n, m in found if m.merged]
    if merged:
        raise ConfigError(f"adapter {merged[0]!r} is merged into its base weight, so switching it off cannot "
                          "give the base model; unmerge() first")
    packed = {id(m): m.packed for m in model.modules() if getattr(m, "packed", None) is not None}
    try:
        for n, m in found:
            set_module(model, n, m.base_layer)
        yield model
    finally:
        for n, m in found:
            set_module(model, n, m)
        for m in model.modules():  # a fused-projection slot cleared by inject stays as it was
            if id(m) in packed:
                m.packed = packed[id(m)]


def sequence_logprobs(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) the sum of log p(token) over each row's labelled (response) tokens, fp32."""
    logits = model(ids[:, :-1]).float()  # (B, T-1, V)
    target = labels[:, 1:]
    mask = target != IGNORE
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


@dataclass
class ReferenceLogprobs:
    """Reference log-probabilities (N, 2): column 0 the chosen, column 1 the rejected response."""

    logps: torch.Tensor
    fingerprint: torch.Tensor

    @classmethod
    @torch.no_grad()
    def compute(cls, model: nn.Module, prefs: PreferenceSet, ref_model: nn.Module | None = None,
                batch_size: int = 8) -> "ReferenceLogprobs":
        """Run the reference once over every pair: ``ref_model``, or ``model`` with its adapters off."""
        was = model.training
        model.eval()
        ctx = contextlib.nullcontext(ref_model.eval()) if ref_model is not None else adapters_disabled(model)
        out = torch.empty(len(prefs), 2, dtype=torch.float32)
        dev = next(model.parameters()).device
        with ctx as ref:
            for s in range(0, len(prefs), batch_size):
                idx = torch.arange(s, min(s + batch_size, len(prefs)))
                ids, labels = prefs.batch(idx)
                lp = sequence_logprobs(ref, ids.to(dev), labels.to(dev)).cpu()
                out[idx, 0], out[idx, 1] = lp[:len(idx)], lp[len(idx):]
        model.train(was)
        return cls(out, prefs.fingerprint())

    def select(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logps[idx, 0], self.logps[idx, 1]

    def save(self, path: str | os.PathLike) -> None:
        from efficientml.core.serialization import save_state_dict

        save_state_dict(path, {"reference_logps": self.logps, "data_fingerprint": self.fingerprint},
                        metadata={"format": "efficientml.dpo_reference", "columns": "chosen,rejected"})

    @classmethod
    def load(cls, path: str | os.PathLike, prefs: PreferenceSet | None = None) -> "ReferenceLogprobs":
        """Read saved log-probabilities; with ``prefs``, refuse them unless they were made for that data."""
        from efficientml.core.serialization import load_state_dict

        state = load_state_dict(path)
        if set(state) != {"reference_logps", "data_fingerprint"}:
            raise CheckpointError(f"{str(path)!r} holds {sorted(state)}; expected reference log-probabilities "
                                  "written by ReferenceLogprobs.save (reference_logps, data_fingerprint)")
        ref = cls(state["reference_logps"], state["data_fingerprint"])
        if prefs is not None and not torch.equal(ref.fingerprint, prefs.fingerprint()):
            raise ConfigError(f"the reference log-probabilities in {str(path)!r} were computed for other "
                              f"preference data ({int(ref.fingerprint[0])} pairs) than the {len(prefs)} pairs "
                              "given; recompute them for this data")
        return ref
