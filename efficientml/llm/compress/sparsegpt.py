"""SparseGPT (Frantar & Alistarh 2023): OBS-style pruning with reconstruction. Columns are visited in
blocks; within a block the mask keeps the weights with the largest ``w² / [H⁻¹]_jj²`` (unstructured:
over the block; N:M: per M columns of each row), and each pruned weight's error is spread over the
remaining columns through the Cholesky factor of H⁻¹, as in GPTQ."""

from __future__ import annotations

import torch

from efficientml.llm.compress.stats import HessianAccumulator
from efficientml.llm.compress.magnitude import LLMPruneConfig
from efficientml.prune.masks import nm_mask


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, cfg: LLMPruneConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Pruned weight (same shape, fp32) and its keep-mask, given the input Hessian."""
    W = W.detach().clone().float()
    H = H.detach().clone().float()
    out, n = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(cfg.damp * torch.mean(torch.diag(H)))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    keep_all = torch.ones_like(W, dtype=torch.bool)
    B = cfg.block_size
    if cfg.n_m is not None and B % cfg.n_m[1]:
        B = cfg.n_m[1] * max(1, B // cfg.n_m[1])
    for i1 in range(0, n, B):
        i2 = min(i1 + B, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if cfg.n_m is None:  # choose this block's mask up front from the OBS saliency
            score = W1.pow(2) / d[None, :].pow(2)
            k = int(score.numel() * cfg.sparsity)
            keep1 = torch.ones_like(W1, dtype=torch.bool)
            if k:
                keep1.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = False
        else:
            keep1 = torch.ones_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if cfg.n_m is not None and i % cfg.n_m[1] == 0:  # N:M: decide the next M columns now
                m = cfg.n_m[1]
                score = W1[:, i:i + m].pow(2) / d[i:i + m][None, :].pow(2)
                keep1[:, i:i + m] = nm_mask(score, cfg.n_m[0], m)
            w = W1[:, i]
            q = w * keep1[:, i]
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        keep_all[:, i1:i2] = keep1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W * keep_all, keep_all


def sparsegpt_processor(model, cfg: LLMPruneConfig, pack: bool = True, log: dict | None = None):
    from efficientml.llm.compress.mappings import scaling_groups

    sets = [g.linears for g in scaling_groups(model)]

    @torch.no_grad()
    def process(data):
        block = data.block
        hess = {s[0]: HessianAccumulator(block.get_submodule(s[0]).in_features, data.device) for s in sets}
        fp_out = data.run({k: h.add for k, h in hess.items()}, keep_outputs=cfg.propagate == "fp")
        for names in sets:
            H = hess[names[0]].value()
            for name in names:
                lin = block.get_submodule(name)
                w, _ = sparsegpt_prune(lin.weight, H, cfg)
                lin.weight.copy_(w.to(lin.weight.dtype))
        return fp_out

    return process
