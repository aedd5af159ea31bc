"""Training memory, measured: the bytes autograd keeps for backward, plus parameters, gradients and
optimizer state — the figure TinyTL is about (activations dominate a CNN's training memory).

    m = training_memory(model, images, labels)     # one real forward/backward/AdamW step
    m["activation_bytes"], m["total_bytes"]

Activations are counted with ``torch.autograd.graph.saved_tensors_hooks``: every tensor the forward
saves for backward, each storage once (a ReLU output that is also the next conv's input counts once),
excluding the model's own parameters and buffers and the input batch. Gradients and AdamW's two
moments are summed from the tensors that exist after one step.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _bytes(tensors) -> int:
    return sum(n for n in dict(_storage(t) for t in tensors if t is not None).values())


def training_memory(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                    lr: float = 1e-3) -> dict[str, Any]:
    """One training step of ``model`` (in its current train/eval mode) on (x, y), measured. The step
    is real: the trainable parameters move by one AdamW update."""
    own = {_storage(t)[0] for t in list(model.parameters()) + list(model.buffers())} | {_storage(x)[0]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, n = _storage(t)
        if ptr not in own and n:
            saved[ptr] = n
        return t

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr) if params else None
    with saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(x), y)
    if opt is not None:
        loss.backward()
        opt.step()
    state = [v for s in (opt.state.values() if opt else []) for v in s.values()
             if isinstance(v, torch.Tensor) and v.dim() > 0]
    out = {"activation_bytes": sum(saved.values()),
           "parameter_bytes": _bytes(list(model.parameters()) + list(model.buffers())),
           "gradient_bytes": _bytes([p.grad for p in params]),
           "optimizer_bytes": _bytes(state),
           "trainable": sum(p.numel() for p in params), "batch": int(x.shape[0]), "loss": float(loss.detach())}
    out["total_bytes"] = sum(out[k] for k in ("activation_bytes", "parameter_bytes", "gradient_bytes",
                                              "optimizer_bytes"))
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    return out
