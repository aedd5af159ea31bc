"""Wanda (Sun et al. 2024): prune by |W_ij|·‖X_j‖₂ — weight magnitude times the norm of the input
channel over the calibration tokens — compared within each output row (unstructured) or each M-group
(N:M). No weight update; one pass per block collects the input norms."""

from __future__ import annotations

import torch

from efficientml.llm.compress.magnitude import LLMPruneConfig, mask_from_score


def wanda_score(w: torch.Tensor, x_sq_sum: torch.Tensor) -> torch.Tensor:
    return w.abs().float() * x_sq_sum.sqrt()[None, :]  # (out, in)


def wanda_processor(model, cfg: LLMPruneConfig, pack: bool = True, log: dict | None = None):
    from efficientml.llm.compress.mappings import scaling_groups

    sets = [g.linears for g in scaling_groups(model)]

    @torch.no_grad()
    def process(data):
        block = data.block
        sq = {s[0]: torch.zeros(block.get_submodule(s[0]).in_features, device=data.device) for s in sets}

        def stat(k):
            def fn(x):
                sq[k] += x.pow(2).sum(0)
            return fn

        fp_out = data.run({k: stat(k) for k in sq}, keep_outputs=cfg.propagate == "fp")
        for names in sets:
            for name in names:
                lin = block.get_submodule(name)
                keep = mask_from_score(wanda_score(lin.weight, sq[names[0]]), cfg, per_row=True)
                lin.weight.mul_(keep.to(lin.weight.dtype))
        return fp_out

    return process
