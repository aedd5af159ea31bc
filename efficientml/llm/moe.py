"""Mixture-of-Experts feed-forward blocks (Mixtral, Qwen2-MoE), in Hugging Face's module names::

    model.layers[i].mlp.gate                          nn.Linear(d, num_experts), no bias: the router
    model.layers[i].mlp.experts[j].gate_proj/up_proj/down_proj   one SwiGLU MLP per expert
    model.layers[i].mlp.shared_expert                 Qwen2-MoE: an MLP every token goes through,
    model.layers[i].mlp.shared_expert_gate            nn.Linear(d, 1): its sigmoid gate

(Mixtral's checkpoints call these ``block_sparse_moe.gate`` / ``experts.j.w1,w3,w2``; the family entry
renames them at load and back on save.)

**Routers** (``LlamaConfig.router``):

- ``"token_choice"`` (Mixtral, Qwen2-MoE, OLMoE): each token's softmax over experts, its top-k kept,
  renormalized to sum 1 when ``norm_topk_prob`` (Mixtral) or not (Qwen2-MoE);
- ``"expert_choice"`` (Zhou et al. 2022): each expert takes the ``capacity = ceil(N·k / E)`` tokens
  that rate it highest, so every expert does the same work and no token is dropped for load reasons
  (a token may get fewer or more than k experts) — for training and upcycling, not causal decoding.

**Execution is grouped per expert**: the (token, expert) pairs are sorted by expert and each expert
runs once over its tokens as one matmul (the layout expert parallelism shards), its outputs weighted
and added back with ``index_add_``. :func:`load_balancing_loss` is the Switch/Mixtral auxiliary loss
over the router logits a forward leaves in ``block.router_logits``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ROUTERS = ("token_choice", "expert_choice")


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg, expert: Callable[[object, int], nn.Module]) -> None:
        super().__init__()
        d, E = cfg.hidden_size, cfg.num_experts
        self.num_experts, self.top_k = E, cfg.num_experts_per_tok
        self.norm_topk_prob, self.router = cfg.norm_topk_prob, cfg.router
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList(expert(cfg, cfg.expert_intermediate_size) for _ in range(E))
        self.shared_expert: nn.Module | None = None
        self.shared_expert_gate: nn.Module | None = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = expert(cfg, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(d, 1, bias=False)
        self.router_logits: torch.Tensor | None = None  # (N, E) of the last forward, for the aux loss
        self.tokens_per_expert: torch.Tensor | None = None  # (E,) of the last forward

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits (N, E) → (token index, expert index, weight) of every routed pair, (P,) each."""
        probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
        N, E = probs.shape
        if self.router == "expert_choice":
            cap = min(N, math.ceil(N * self.top_k / E))
            w, tok = probs.t().topk(cap, dim=-1)  # (E, cap): each expert's best tokens
            exp = torch.arange(E, device=probs.device)[:, None].expand_as(tok)
            return tok.reshape(-1), exp.reshape(-1), w.reshape(-1)
        w, exp = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        tok = torch.arange(N, device=probs.device)[:, None].expand_as(exp)
        return tok.reshape(-1), exp.reshape(-1), w.reshape(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])  # (N, d)
        logits = self.gate(h)  # (N, E)
        self.router_logits = logits
        tok, exp, w = self.route(logits)
        order = exp.argsort(stable=True)  # pairs grouped by expert
        tok, w = tok[order], w[order]
        counts = torch.bincount(exp, minlength=self.num_experts)
        self.tokens_per_expert = counts
        out = torch.zeros_like(h)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                idx = tok[start:start + n]
                y = self.experts[e](h[idx]) * w[start:start + n, None].to(h.dtype)
                out.index_add_(0, idx, y)
                start += n
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(h)) * self.shared_expert(h)
        return out.reshape(shape)


def load_balancing_loss(router_logits: list[torch.Tensor] | tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss as Mixtral uses it, over all layers' router logits (N, E):
    ``E · Σ_e f_e · P_e``, f_e the fraction of routed (token, slot) pairs that chose expert e, P_e the
    mean router probability of e; 1·k when perfectly balanced (transformers' ``load_balancing_loss_func``
    without an attention mask)."""
    logits = torch.cat([g.float() for g in router_logits], dim=0)  # (layers·N, E)
    probs = torch.softmax(logits, dim=-1)
    E = probs.shape[-1]
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, E).float()  # (M, k, E)
    f = chosen.mean(dim=0)  # (k, E)
    p = probs.mean(dim=0)  # (E,)
    return E * (f * p[None]).sum()


def router_logits(model: nn.Module) -> list[torch.Tensor]:
    """The router logits every MoE block of ``model`` left in its last forward, in layer order."""
    return [m.router_logits for m in model.modules() if isinstance(m, SparseMoeBlock) and m.router_logits is not None]
