"""Gradient-based architecture search over an :class:`~efficientml.nas.space.MBSpace`, on the relaxed
:class:`~efficientml.nas.gradient_ops.MixedNet` (its modes and estimators are described there).

- :func:`darts_search` — first-order DARTS (Liu et al. 2019): each step, an α step on a validation
  batch with every candidate mixed by softmax(α), then a weight step on a training batch (the paper's
  Algorithm 1 with ξ = 0: the weights are not unrolled).
- :func:`proxyless_search` — ProxylessNAS (Cai et al. 2019) path binarization: the weight step runs ONE
  sampled path per slot (binary gates; only that path's weights are updated); the α step uses the
  **two-path** estimator — two paths drawn per slot, ``∂L/∂α_i = Σ_j ∂L/∂g_j · p̃_j(δ_ij − p̃_i)``
  over the pair — after which the pair's logits are shifted so their log-sum-exp is what it was before
  the step (the paper's rescaling: the loss term leaves the unsampled paths' probabilities unchanged;
  a latency term, which moves every α, still moves them).

Both may add a latency loss from a :class:`~efficientml.nas.latency.LatencyTable`: the expected
latency ``E[lat] = lat(stem) + lat(head) + Σ_slots Σ_i softmax(α_slot)_i · lat(op_i)`` (ms; skip costs
0; the entries are those :func:`~efficientml.nas.latency.op_keys` gives each candidate block), added
**additively** to the α step's loss as ``latency_weight · E[lat]`` (not the paper's multiplicative
``CE · λ·log(E[lat])^β`` form). It is differentiable in α directly, so it needs no sampling. When α is
one-hot and has no skip before a block in a stage, ``E[lat]`` equals ``table.predict(net.derive())``.

Each search returns a history dict: per step the losses, ``E[lat]``, the mean entropy of softmax(α)
and the argmax choice per slot; then the derived :class:`~efficientml.nas.space.Arch` (always a member
of the space), softmax(α) per slot, its expected and table-predicted latency and its analytical costs.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from efficientml.core.errors import ConfigError
from efficientml.nas.costs import subnet_cost
from efficientml.nas.gradient_ops import MixedNet, choice_name
from efficientml.nas.latency import LatencyTable, op_keys

SlotLatencies = tuple[float, list[torch.Tensor]]  # (stem + head ms, per slot (n_candidates,) ms)
_ALPHA_BETAS = {"darts": (0.5, 0.999), "proxyless": (0.0, 0.999)}  # Adam betas of the papers' α optimizers
_GRAD_CLIP = 5.0                                                    # DARTS' weight gradient norm clip


def candidate_keys(net: MixedNet) -> tuple[tuple, list[list[tuple | None]], tuple]:
    """(stem key, per slot the table key of every candidate — None for skip —, head key). A slot's
    key does not depend on the other slots' choices: only a stage's first block changes the shape."""
    space, n = net.space, net.space.n_slots
    full = space.largest(resolution=net.resolution, width=net.width)
    per_choice = {}
    for k in space.kernels:
        for e in space.expands:
            per_choice[(k, e)] = op_keys(space, dataclasses.replace(full, kernels=(k,) * n, expands=(e,) * n))
    keys = next(iter(per_choice.values()))
    slots = [[None if ch is None else per_choice[ch][1 + s] for ch in op.choices] for s, op in enumerate(net.slots)]
    return keys[0], slots, keys[-1]


def slot_latencies(net: MixedNet, table: LatencyTable) -> SlotLatencies:
    """Every candidate's table latency (module docstring); entries missing from the table are measured
    and added, as :meth:`LatencyTable.predict` does."""
    if table.space != net.space:
        raise ConfigError("the latency table was built for another search space than the MixedNet's")
    stem, slots, head = candidate_keys(net)
    wanted = [stem, head] + [k for ks in slots for k in ks if k is not None]
    table.measure([k for k in dict.fromkeys(wanted) if k not in table.entries])
    device = net.alphas[0].device
    vecs = [torch.tensor([0.0 if k is None else table.entries[k] for k in ks], device=device) for ks in slots]
    return table.entries[stem] + table.entries[head], vecs


def expected_latency(net: MixedNet, lat: LatencyTable | SlotLatencies) -> torch.Tensor:
    """E[lat] in ms under softmax(α) (module docstring): a scalar, differentiable in α."""
    const, vecs = slot_latencies(net, lat) if isinstance(lat, LatencyTable) else lat
    total = torch.tensor(float(const), device=net.alphas[0].device)
    for a, v in zip(net.alphas, vecs):
        total = total + (F.softmax(a, dim=0) * v).sum()
    return total


def darts_search(net: MixedNet, train_loader: Iterable, val_loader: Iterable, steps: int, lr_w: float,
                 lr_alpha: float, latency_weight: float = 0.0, table: LatencyTable | None = None) -> dict:
    """First-order DARTS on ``net`` for ``steps`` (α step on a validation batch, then weight step on a
    training batch); loaders yield ``(images, labels)`` and are cycled. Weights: SGD (momentum 0.9,
    gradient norm clipped at 5); α: Adam (betas 0.5, 0.999). Returns the history (module docstring)."""
    return _search("darts", net, train_loader, val_loader, steps, lr_w, lr_alpha, latency_weight, table, 0)


def proxyless_search(net: MixedNet, train_loader: Iterable, val_loader: Iterable, steps: int, lr_w: float,
                     lr_alpha: float, latency_weight: float = 0.0, table: LatencyTable | None = None,
                     seed: int = 0) -> dict:
    """ProxylessNAS on ``net`` (module docstring): the weight step on one sampled path, the α step with
    the two-path estimator and rescaling; paths are drawn from ``net.generator`` seeded with ``seed``.
    Optimizers as :func:`darts_search` but α's Adam betas (0, 0.999). Returns the history."""
    return _search("proxyless", net, train_loader, val_loader, steps, lr_w, lr_alpha, latency_weight, table, seed)


def _search(method: str, net: MixedNet, train_loader: Iterable, val_loader: Iterable, steps: int, lr_w: float,
            lr_alpha: float, latency_weight: float, table: LatencyTable | None, seed: int) -> dict:
    if steps < 1 or lr_w < 0 or lr_alpha < 0 or latency_weight < 0:
        raise ConfigError(f"a {method} search needs steps ≥ 1 and non-negative learning rates and latency weight, "
                          f"got steps={steps}, lr_w={lr_w}, lr_alpha={lr_alpha}, latency_weight={latency_weight}")
    if latency_weight > 0 and table is None:
        raise ConfigError("a latency weight needs a latency table (table=LatencyTable)")
    lat = slot_latencies(net, table) if table is not None else None
    w_opt = torch.optim.SGD(net.weight_parameters(), lr=lr_w, momentum=0.9)
    a_opt = torch.optim.Adam(net.arch_parameters(), lr=lr_alpha, betas=_ALPHA_BETAS[method])
    net.generator.manual_seed(seed)
    train, val = _cycle(train_loader, "train_loader"), _cycle(val_loader, "val_loader")
    log = []
    net.train()
    for step in range(steps):
        val_loss, e_lat = _alpha_step(net, a_opt, next(val), method, latency_weight, lat)
        train_loss = _weight_step(net, w_opt, next(train), method)
        log.append(_summary(net, step, train_loss, val_loss, e_lat))
    net.mode = "mixed"
    arch = net.derive()
    return {"method": method, "steps": log, "arch": arch.to_dict(), "key": arch.key(),
            "choices": [choice_name(c) for c in net.choices()], "probs": [p.tolist() for p in net.probs()],
            "expected_latency_ms": None if lat is None else expected_latency(net, lat).item(),
            "predicted_latency_ms": None if table is None else table.predict(arch),
            "costs": subnet_cost(net.space, arch).to_dict(),
            "settings": {"steps": steps, "lr_w": lr_w, "lr_alpha": lr_alpha, "latency_weight": latency_weight,
                         "seed": seed}}


def _alpha_step(net: MixedNet, opt: torch.optim.Optimizer, batch: Sequence[torch.Tensor], method: str,
                latency_weight: float, lat: SlotLatencies | None) -> tuple[float, float | None]:
    """One α update on a validation batch; the weights' gradients are not computed."""
    x, y = (t.to(net.alphas[0].device) for t in batch[:2])
    net.mode = "mixed" if method == "darts" else "two_path"
    loss = F.cross_entropy(net(x), y)
    e_lat = expected_latency(net, lat) if lat is not None else None
    total = loss + latency_weight * e_lat if e_lat is not None and latency_weight > 0 else loss
    alphas = net.arch_parameters()
    before = [a.detach().clone() for a in alphas]
    grads = torch.autograd.grad(total, alphas, allow_unused=True)
    opt.zero_grad(set_to_none=True)
    for a, g in zip(alphas, grads):
        a.grad = g
    opt.step()
    if method == "proxyless":
        _rescale(net, before)
    return loss.item(), None if e_lat is None else e_lat.item()


@torch.no_grad()
def _rescale(net: MixedNet, before: list[torch.Tensor]) -> None:
    """Shift each sampled pair's logits so their log-sum-exp is what it was before the step."""
    for op, a, old in zip(net.slots, net.alphas, before):
        if len(op.last_sample) == 2:
            idx = list(op.last_sample)
            a[idx] += torch.logsumexp(old[idx], 0) - torch.logsumexp(a[idx], 0)


def _weight_step(net: MixedNet, opt: torch.optim.Optimizer, batch: Sequence[torch.Tensor], method: str) -> float:
    """One weight update on a training batch (DARTS: all candidates mixed; Proxyless: one sampled path
    per slot, so only its weights get a gradient); α gets no gradient."""
    x, y = (t.to(net.alphas[0].device) for t in batch[:2])
    net.mode = "mixed" if method == "darts" else "binary"
    weights = net.weight_parameters()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(net(x), y)
    loss.backward(inputs=[w for w in weights if w.requires_grad])
    torch.nn.utils.clip_grad_norm_([w for w in weights if w.grad is not None], _GRAD_CLIP)
    opt.step()
    return loss.item()


def _summary(net: MixedNet, step: int, train_loss: float, val_loss: float, e_lat: float | None) -> dict:
    probs = net.probs()
    entropy = sum(float(-(p * p.clamp_min(1e-12).log()).sum()) for p in probs) / len(probs)
    return {"step": step, "train_loss": train_loss, "val_loss": val_loss, "expected_latency_ms": e_lat,
            "entropy": entropy, "max_probs": [round(float(p.max()), 4) for p in probs],
            "choices": [choice_name(c) for c in net.choices()]}


def _cycle(loader: Iterable, name: str) -> Iterator:
    """The loader's batches, restarted whenever it is exhausted."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ConfigError(f"{name} yielded no batches; expected (images, labels) batches")
