"""Serving many BitDelta fine-tunes over one base, and distilling their scales.

:class:`DeltaServer` wraps a base model once: every linear some delta covers becomes a
:class:`DeltaLinear` that holds the shared base layer plus, per delta name, the packed signs (a uint8
buffer) and the scale (a parameter). ``use(name)`` switches every layer to that delta (``None``: the
base); the base weights are never copied or reloaded. Dense deltas (norms, an untied embedding) are
set as ``original + Δ`` from a copy of only those parameters, so switching back is exact::

    y = base(x) + α_name · (x @ sign_nameᵀ)

The signs are unpacked on the fly in each forward; ``cache=True`` keeps the active delta's ±1 matrix
unpacked (the speed of a dense matmul for the memory of one float matrix per layer).

    server = DeltaServer(base).add("chat", delta_a).add("code", delta_b)
    server.use("chat"); logits = server(ids)
    distill_scales(server, "chat", finetuned_chat, calib_ids)     # α fitted to the fine-tune's logits
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.errors import ConfigError
from efficientml.core.modules import get_module, set_module
from efficientml.finetune.bitdelta import NAME, BitDelta, unpack_signs


class DeltaLinear(nn.Module):
    """A shared base linear plus any number of sign-and-scale deltas, one of them active."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scales = nn.ParameterDict()
        self.active: str | None = None
        self.cache = False
        self._unpacked: tuple[str, torch.Tensor] | None = None

    def add(self, name: str, packed: torch.Tensor, scale: torch.Tensor) -> None:
        self.register_buffer(f"signs_{name}", packed.to(self.base_layer.weight.device))
        self.scales[name] = nn.Parameter(scale.detach().float().reshape(()).clone(), requires_grad=False)

    def signs(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        if self.cache and self._unpacked is not None and self._unpacked[0] == name:
            return self._unpacked[1].to(dtype)
        s = unpack_signs(getattr(self, f"signs_{name}"), (self.out_features, self.in_features), dtype)
        if self.cache:
            self._unpacked = (name, s)
        return s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.active is None or self.active not in self.scales:
            return y
        return y + F.linear(x, self.signs(self.active, x.dtype)) * self.scales[self.active].to(x.dtype)


class DeltaServer(nn.Module):
    """One base model serving several BitDelta fine-tunes; ``use(name)`` picks one."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.model = base
        self.config = getattr(base, "config", None)
        for p in base.parameters():
            p.requires_grad_(False)
        self.names: list[str] = []
        self._dense: dict[str, dict[str, torch.Tensor]] = {}
        self._originals: dict[str, torch.Tensor] = {}
        self.active: str | None = None

    def add(self, name: str, delta: BitDelta) -> "DeltaServer":
        if not isinstance(name, str) or not NAME.match(name) or name in self.names:
            raise ConfigError(f"delta name {name!r} must be new and made of letters, digits, '_' or '-'")
        params = dict(self.model.named_parameters())
        for k, packed in delta.signs.items():
            mod = k[:-len(".weight")]
            layer = get_module(self.model, mod)
            if isinstance(layer, nn.Linear):
                layer = DeltaLinear(layer)
                set_module(self.model, mod, layer)
            elif not isinstance(layer, DeltaLinear):
                raise ConfigError(f"delta {name!r} covers {mod!r}, which is a {type(layer).__name__} in the base, "
                                  "not a linear layer (was it made for another base model?)")
            if (layer.out_features, layer.in_features) != tuple(delta.shapes[k]):
                raise ConfigError(f"delta {name!r}: {mod!r} is {layer.out_features}×{layer.in_features} in the base, "
                                  f"the delta {delta.shapes[k]} (another base model?)")
            layer.add(name, packed, delta.scales[k])
        for k, d in delta.dense.items():
            key = k if k in params else None
            if key is None or params[key].shape != d.shape:
                raise ConfigError(f"delta {name!r} has a dense delta for {k!r}, which the base lacks or shapes "
                                  "differently (another base model?)")
            self._originals.setdefault(k, params[k].detach().clone())
        for m in self.model.modules():  # a fused q/k/v or gate/up buffer would bypass the deltas: drop it
            if getattr(m, "packed", None) is not None and any(isinstance(getattr(m, f, None), DeltaLinear)
                                                              for f in getattr(m, "fusable", ())):
                m.packed = None
        self._dense[name] = dict(delta.dense)
        self.names.append(name)
        return self

    @torch.no_grad()
    def use(self, name: str | None, cache: bool = False) -> "DeltaServer":
        """Serve delta ``name`` (``None``: the base alone)."""
        if name is not None and name not in self.names:
            raise ConfigError(f"no delta named {name!r}; added: {', '.join(self.names) or 'none'}")
        params = dict(self.model.named_parameters())
        for k, orig in self._originals.items():
            d = self._dense.get(name, {}).get(k) if name is not None else None
            params[k].copy_(orig if d is None else (orig.float() + d.float()).to(orig.dtype))
        for m in self.layers():
            m.active, m.cache, m._unpacked = name, cache, None
        self.active = name
        return self

    def layers(self) -> list[DeltaLinear]:
        return [m for m in self.model.modules() if isinstance(m, DeltaLinear)]

    def forward(self, *args: Any, **kw: Any) -> torch.Tensor:
        return self.model(*args, **kw)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _mse(server: DeltaServer, teacher: nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(F.mse_loss(server(b).float(), teacher(b).float()).item() for b in batches) / len(batches)


def distill_scales(server: DeltaServer, name: str, finetuned: nn.Module, calib: torch.Tensor, steps: int = 50,
                   lr: float = 1e-4, batch_size: int = 4) -> dict[str, Any]:
    """Fit delta ``name``'s scales (only them) so the served model's logits match ``finetuned``'s on the
    calibration rows ``calib`` (N, T): Adam on the mean squared logit error, as the paper does.
    Returns the logit MSE before and after, and the curve."""
    if steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    server.use(name, cache=True)
    scales = [m.scales[name] for m in server.layers() if name in m.scales]
    batches = [calib[s:s + batch_size].to(server.device) for s in range(0, calib.shape[0], batch_size)]
    finetuned.eval()
    with torch.no_grad():
        targets = [finetuned(b).float() for b in batches]
    before = _mse(server, finetuned, batches)
    for s in scales:
        s.requires_grad_(True)
    opt = torch.optim.Adam(scales, lr=lr)
    curve = []
    try:
        for step in range(steps):
            b = step % len(batches)
            loss = F.mse_loss(server(batches[b]).float(), targets[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            curve.append(loss.item())
    finally:
        for s in scales:
            s.requires_grad_(False)
    return {"mse_before": before, "mse_after": _mse(server, finetuned, batches), "curve": curve, "steps": steps}


def export_delta(server: DeltaServer, name: str) -> BitDelta:
    """Delta ``name`` as a :class:`BitDelta` with its current (e.g. distilled) scales."""
    signs, shapes, scales = {}, {}, {}
    for n, m in server.model.named_modules():
        if isinstance(m, DeltaLinear) and name in m.scales:
            k = f"{n}.weight"
            signs[k], shapes[k] = getattr(m, f"signs_{name}"), (m.out_features, m.in_features)
            scales[k] = m.scales[name].detach().clone()
    return BitDelta(signs, shapes, scales, dict(server._dense.get(name, {})))
