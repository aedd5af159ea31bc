"""AdamW with 8-bit optimizer states: blockwise dynamic quantization of both moments (Dettmers et al.,
"8-bit Optimizers via Block-wise Quantization", 2022), our own code.

Each moment is stored as uint8 codes into a 256-entry *dynamic* map (values spread over many binades,
so small entries keep their relative precision) times one fp32 absmax per block of ``block`` (256)
elements: 8 + 32/256 = 8.125 bits per element instead of 32. The first moment m uses a signed map
(16 steps per binade near the block maximum, fewer further down, 22 binades in all); the second is
stored as √v with an unsigned map (46 binades), which keeps ``m / (√v + eps)`` close where v is small. Each step dequantizes,
updates in fp32 and re-quantizes, one parameter at a time, so the fp32 scratch is one tensor's worth.
Tensors with fewer than ``min_8bit_size`` elements keep fp32 states (as bitsandbytes does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _dynamic(binades: list[tuple[int, int]]) -> torch.Tensor:
    """Magnitudes in (0, 1]: for each (count, steps), ``count`` binades with ``steps`` linear steps each,
    from 1 down: fine steps for large values, wide range for small ones (as bitsandbytes' dynamic map)."""
    vals, e = {1.0}, 0
    for count, steps in binades:
        for _ in range(count):
            vals.update(2.0 ** -(e + 1) * (1 + f / steps) for f in range(steps))
            e += 1
    return torch.tensor(sorted(vals), dtype=torch.float64)


def _signed_map() -> torch.Tensor:
    mags = _dynamic([(4, 16), (4, 8), (4, 4), (4, 2), (6, 1)])  # 127 magnitudes, down to 2^-22
    return torch.cat([-mags.flip(0), torch.zeros(1, dtype=torch.float64), mags])  # 255 values, sorted


def _unsigned_map() -> torch.Tensor:
    vals = _dynamic([(8, 16), (8, 8), (8, 4), (8, 2), (14, 1)])  # 255 values, down to 2^-46
    return torch.cat([torch.zeros(1, dtype=torch.float64), vals])  # 256 values, 0 exact


class _Codebook:
    def __init__(self, values: torch.Tensor) -> None:
        self.values = values.float()
        self.mid = (self.values[1:] + self.values[:-1]) / 2

    def quantize(self, x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x (n,) → uint8 codes (n,), fp32 absmax (ceil(n/block),)."""
        n = x.numel()
        xb = F.pad(x.reshape(-1), (0, (-n) % block)).view(-1, block)
        absmax = xb.abs().amax(1).clamp(min=1e-30)
        codes = torch.bucketize(xb / absmax[:, None], self.mid.to(x.device)).to(torch.uint8)
        return codes.view(-1)[:n], absmax

    def dequantize(self, codes: torch.Tensor, absmax: torch.Tensor, block: int) -> torch.Tensor:
        n = codes.numel()
        vals = self.values.to(codes.device)[codes.long()]
        vb = F.pad(vals, (0, (-n) % block)).view(-1, block) * absmax[:, None]
        return vb.view(-1)[:n]


SIGNED, UNSIGNED = _Codebook(_signed_map()), _Codebook(_unsigned_map())


class AdamW8bit(torch.optim.Optimizer):
    """Drop-in AdamW (decoupled weight decay, bias correction) with 8-bit blockwise moments."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, block: int = 256, min_8bit_size: int = 4096) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.block, self.min_8bit_size = block, min_8bit_size

    def _moments(self, p: torch.Tensor, st: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "m" in st:  # small tensor: fp32 states
            return st["m"], st["v"]
        if "m_codes" not in st:
            z = torch.zeros(p.numel(), device=p.device)
            return z, z.clone()
        m = SIGNED.dequantize(st["m_codes"], st["m_absmax"], self.block)
        r = UNSIGNED.dequantize(st["r_codes"], st["r_absmax"], self.block)  # r = √v
        return m, r * r

    def _store(self, p: torch.Tensor, st: dict, m: torch.Tensor, v: torch.Tensor) -> None:
        if p.numel() < self.min_8bit_size:
            st["m"], st["v"] = m, v
            return
        st["m_codes"], st["m_absmax"] = SIGNED.quantize(m, self.block)
        st["r_codes"], st["r_absmax"] = UNSIGNED.quantize(v.sqrt(), self.block)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                st["step"] = st.get("step", 0) + 1
                g = p.grad.detach().float().reshape(-1)
                m, v = self._moments(p, st)
                m = m.mul_(b1).add_(g, alpha=1 - b1)
                v = v.mul_(b2).addcmul_(g, g, value=1 - b2)
                t = st["step"]
                denom = (v / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                upd = (m / (1 - b1 ** t)) / denom
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(upd.view_as(p).to(p.dtype), alpha=-group["lr"])
                self._store(p, st, m, v)
        return loss

    def state_bytes(self) -> int:
        """Bytes held by the optimizer states (codes, block scales, small fp32 states)."""
        return sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values()
                   if isinstance(t, torch.Tensor))
