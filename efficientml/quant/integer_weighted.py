"""The weighted steps of an integer program (Conv2d, Linear) and how their int8 weights are packed
for PyTorch's fast kernels.

Two properties of those kernels shape the packing:

- **Saturation.** AVX2 kernels without VNNI (fbgemm's and oneDNN's) multiply u8·s8 and sum adjacent
  pairs in int16 with saturation (``vpmaddubsw``): 2·255·127 = 64 770 does not fit. With 7-bit
  weights (|w| ≤ 63, the default ``reduce_range``) every pair fits; with full 8-bit weights on such a
  CPU the weights are packed for an engine whose sums are exact (QNNPACK widens products to 32 bits),
  so the fast path still matches the integer reference. Whether the default engine saturates is a
  feature check on a tiny conv (:func:`engine_saturates`), not a CPU-model guess; depthwise convs
  are probed separately, since PyTorch's x86 engine runs wide ones on fbgemm's depthwise kernel,
  which saturates even on VNNI CPUs.
- **Per-shape state.** oneDNN (PyTorch's x86 engine on VNNI CPUs) caches its conv primitive for the
  input shape of the *first* call of a packed weight and rebuilds it on every later call of another
  shape: a model whose first call had batch 8 ran batch 1 at half speed. Packs are therefore kept per
  (input shape, threads), created lazily and shared by every :meth:`IntegerModel.with_mode` copy.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.errors import UnsupportedError
from efficientml.quant.integer_ops import IntegerConfig, Step, _act, _clamp_bounds, fixed_point, rounding_shift

MAX_PACKS = 8                # packed copies kept per layer (one per input shape seen; oldest dropped)
SAFE_WEIGHT = 64             # |w| ≤ 64: 2·255·64 = 32 640 fits an int16 pair sum


@contextlib.contextmanager
def _engine(name: str | None) -> Iterator[None]:
    """Select PyTorch's quantized engine while packing (packed weights remember their engine)."""
    old = torch.backends.quantized.engine
    if name is not None and name != old:
        torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


def _qtensor(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch._make_per_channel_quantized_tensor(codes.to(torch.int8), scale.double(),
                                                    torch.zeros(codes.shape[0], dtype=torch.int64), 0)


def _saturated(x_shape: tuple[int, ...], w_shape: tuple[int, ...], groups: int, padding: int) -> bool:
    """Whether a conv of codes 255 against weights 127 loses its exact sum: the output scale puts
    the exact sum at code 128 (every tap inside the input); pairwise-saturated sums land far below."""
    exact = w_shape[1] * w_shape[2] * w_shape[3] * 255 * 127
    x = torch._make_per_tensor_quantized_tensor(torch.full(x_shape, 255, dtype=torch.uint8), 1.0, 0)
    w = _qtensor(torch.full(w_shape, 127), torch.ones(w_shape[0]))
    packed = torch.ops.quantized.conv2d_prepack(w, None, [1, 1], [padding, padding], [1, 1], groups)
    y = torch.ops.quantized.conv2d(x, packed, exact / 128, 0).int_repr()
    inner = y[..., padding:y.shape[-2] - padding, padding:y.shape[-1] - padding]
    return int(inner.min()) < 120


@functools.lru_cache(maxsize=None)
def engine_saturates(engine: str, depthwise: bool = False) -> bool:
    """Whether ``engine``'s int8 conv loses a sum that needs more than 16 bits per u8·s8 pair: on a
    1×1 conv of 32 inputs, or (``depthwise``) on a 3×3 depthwise conv with padding 1 over 256
    channels — PyTorch's x86 engine sends depthwise convs of ≥ 128 channels to fbgemm's kernel,
    which saturates even on VNNI CPUs whose other kernels are exact."""
    with warnings.catch_warnings(), _engine(engine):
        warnings.simplefilter("ignore")      # torch deprecates quantized-tensor creation; still needed
        if depthwise:
            return _saturated((2, 256, 4, 4), (256, 1, 3, 3), 256, 1)
        return _saturated((1, 32, 1, 1), (1, 32, 1, 1), 1, 0)


def exact_engine(w_q: torch.Tensor, depthwise: bool = False) -> str | None:
    """The engine to pack ``w_q`` for: None (the default) unless its pairs can saturate there."""
    default = torch.backends.quantized.engine
    if int(w_q.abs().max()) <= SAFE_WEIGHT or not engine_saturates(default, depthwise):
        return None
    if "qnnpack" in torch.backends.quantized.supported_engines and not engine_saturates("qnnpack", depthwise):
        return "qnnpack"
    warnings.warn(f"the {default!r} int8 kernels saturate 16-bit pair sums on this CPU and no exact "
                  "engine is available: the fast path may differ from the integer reference; "
                  "IntegerConfig(reduce_range=True) avoids it", RuntimeWarning, stacklevel=3)
    return None


class WeightedStep(Step):
    """Conv2d or Linear with BN folded in and an optional fused ReLU/ReLU6."""

    def __init__(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None, act: str | None):
        super().__init__(name)
        self.weight = weight.detach().float().clone()
        self.bias = (bias.detach().float().clone() if bias is not None
                     else torch.zeros(weight.shape[0]))
        self.act = act
        self._packs: dict[tuple, Any] = {}

    def float(self, x: torch.Tensor) -> torch.Tensor:
        return _act(self._op(x, self.weight, self.bias), self.act)

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def finalize(self, cfg: IntegerConfig) -> None:
        qmax = cfg.weight_qmax()
        flat = self.weight.reshape(self.weight.shape[0], -1)
        amax = flat.abs().amax(1) if cfg.per_channel else flat.abs().max().expand(flat.shape[0])
        self.w_scale = torch.clamp(amax / qmax, min=1e-12)                           # (C_out,)
        self.w_q = torch.clamp(torch.round(self.weight / self.w_scale.view(-1, *[1] * (self.weight.dim() - 1))),
                               -qmax, qmax).to(torch.int32)
        s_in = self.in_qp[0].scale
        self.b_scale = (s_in * self.w_scale.double()).float()                        # S_bias = S_in·S_w
        self.b_q = torch.round(self.bias.double() / self.b_scale.double()).to(torch.int32)
        z_in = self.in_qp[0].zero_point
        # Σ_k q_w (per output channel): the cross term Z_in·Σ q_w folds into the bias
        self.w_sum = self.w_q.reshape(self.w_q.shape[0], -1).sum(1).to(torch.int64)
        self.b_eff = self.b_q.to(torch.int64) - z_in * self.w_sum
        m = s_in * self.w_scale.double() / self.out_qp.scale                          # per channel
        self.m0, self.shift = fixed_point(m)
        self.lo, self.hi = _clamp_bounds(self.out_qp, self.act)
        self._packs = {}

    def _requant(self, acc: torch.Tensor, channel_dim: int) -> torch.Tensor:
        shape = [1] * acc.dim()
        shape[channel_dim] = -1
        out = rounding_shift(acc, self.m0.view(shape), self.shift.view(shape)) + self.out_qp.zero_point
        return torch.clamp(out, self.lo, self.hi).to(torch.int32)

    def emulate(self, q: torch.Tensor) -> torch.Tensor:
        x = self.in_qp[0].dequantize(q)
        w = self.w_q.float() * self.w_scale.view(-1, *[1] * (self.weight.dim() - 1))
        y = self._op(x, w, self.b_q.double().mul(self.b_scale.double()).float())
        out = torch.round(y / self.out_qp.scale) + self.out_qp.zero_point
        return torch.clamp(out, self.lo, self.hi).to(torch.int32)

    def packed(self, q: torch.Tensor) -> Any:
        """The packed weight for inputs shaped like ``q`` (created on first use of that shape)."""
        key = (tuple(q.shape), torch.get_num_threads())
        pack = self._packs.get(key)
        if pack is None:
            if len(self._packs) >= MAX_PACKS:
                self._packs.pop(next(iter(self._packs)))
            with _engine(exact_engine(self.w_q, getattr(self, "depthwise", False))):
                pack = self._packs[key] = self._prepack(_qtensor(self.w_q, self.w_scale), self._fbias())
        return pack

    def _prepack(self, w: torch.Tensor, b: torch.Tensor) -> Any:
        raise NotImplementedError

    def _fbias(self) -> torch.Tensor:
        return (self.b_q.double() * self.b_scale.double()).float()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_packs": {}}      # packs are per process/CPU: rebuilt on first use


def _numeric_padding(conv: nn.Conv2d, name: str) -> tuple[int, int]:
    """The conv's padding as (ph, pw); ``"valid"`` is 0 and ``"same"`` its symmetric equivalent."""
    if conv.padding_mode != "zeros":
        raise UnsupportedError(f"conv {name!r} uses padding_mode {conv.padding_mode!r}; integer conv "
                               "supports zero padding only (put an nn.ReflectionPad2d before it instead)")
    if conv.padding == "valid":
        return 0, 0
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            raise UnsupportedError(f"conv {name!r} uses padding='same' with an even kernel, which pads "
                                   "unevenly; integer conv needs symmetric padding (use nn.ZeroPad2d)")
        return total[0] // 2, total[1] // 2
    return tuple(conv.padding)


class ConvStep(WeightedStep):
    kind = "conv2d"

    def __init__(self, name: str, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None,
                 act: str | None):
        super().__init__(name, weight, bias, act)
        self.padding = _numeric_padding(conv, name)
        self.stride, self.dilation, self.groups = conv.stride, conv.dilation, conv.groups

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.weight.shape[0] and self.weight.shape[1] == 1

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def integer(self, q: torch.Tensor) -> torch.Tensor:
        z_in = self.in_qp[0].zero_point
        B, C, H, W = q.shape
        ph, pw = self.padding
        x = F.pad(q, (pw, pw, ph, ph), value=z_in) if (ph or pw) else q    # pad with the real zero
        kh, kw = self.w_q.shape[2:]
        # im2col moves integers only (exact in float32 for |q| ≤ 2^24); the products sum in int32
        cols = F.unfold(x.float(), (kh, kw), dilation=self.dilation, stride=self.stride).to(torch.int32)
        G, O = self.groups, self.w_q.shape[0]
        L = cols.shape[-1]
        cols = cols.view(B, G, -1, L)                                     # (B, G, C/G·kh·kw, L)
        w = self.w_q.view(G, O // G, -1)                                  # (G, O/G, C/G·kh·kw)
        acc = torch.matmul(w, cols).view(B, O, L)                         # int32 accumulation
        acc = acc.to(torch.int64) + self.b_eff.view(1, -1, 1)
        Ho = (H + 2 * ph - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        Wo = (W + 2 * pw - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return self._requant(acc, 1).view(B, O, Ho, Wo)

    def _prepack(self, w: torch.Tensor, b: torch.Tensor) -> Any:
        return torch.ops.quantized.conv2d_prepack(w, b, list(self.stride), list(self.padding),
                                                  list(self.dilation), self.groups)

    def fast(self, q: torch.Tensor) -> torch.Tensor:
        op = torch.ops.quantized.conv2d_relu if self.act == "relu" else torch.ops.quantized.conv2d
        y = op(q, self.packed(q), self.out_qp.scale, self.out_qp.zero_point)
        return torch.clamp(y, 0.0, 6.0) if self.act == "relu6" else y


class LinearStep(WeightedStep):
    kind = "linear"

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b)

    def integer(self, q: torch.Tensor) -> torch.Tensor:
        acc = torch.matmul(q.to(torch.int32), self.w_q.t())              # (…, C_out) int32
        return self._requant(acc.to(torch.int64) + self.b_eff, -1)

    def _prepack(self, w: torch.Tensor, b: torch.Tensor) -> Any:
        return torch.ops.quantized.linear_prepack(w, b)

    def fast(self, q: torch.Tensor) -> torch.Tensor:
        op = torch.ops.quantized.linear_relu if self.act == "relu" else torch.ops.quantized.linear
        y = op(q, self.packed(q), self.out_qp.scale, self.out_qp.zero_point)
        return torch.clamp(y, 0.0, 6.0) if self.act == "relu6" else y
