"""Per-module shrink rules: a new, smaller Conv / BatchNorm / Linear holding the kept slices.

``shrink(module, keep_in, keep_out)``: ``keep_in`` / ``keep_out`` list the input / output channel
indices that survive (``None`` keeps that side whole). Registered for PyTorch's modules in
:mod:`efficientml.prune.channel_ops`; used by :class:`efficientml.prune.surgery.ChannelPlan`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from efficientml.core.errors import ShapeError, UnsupportedError


def _idx(keep: list[int], device: torch.device) -> torch.Tensor:
    return torch.as_tensor(keep, dtype=torch.long, device=device)


def shrink_conv(m: nn.Module, keep_in: list[int] | None, keep_out: list[int] | None) -> nn.Module:
    w = m.weight.detach()
    depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
    if depthwise:
        keep = keep_out if keep_out is not None else keep_in
        if keep_in is not None and keep_out is not None and list(keep_in) != list(keep_out):
            raise ShapeError("a depthwise conv must keep the same input and output channels")
        keep = keep if keep is not None else list(range(m.out_channels))
        cin = cout = groups = len(keep)
        w = w[_idx(keep, w.device)]
        bias_keep = keep
    else:
        if m.groups != 1:
            raise UnsupportedError(f"cannot shrink a grouped conv with groups={m.groups}")
        if keep_out is not None:
            w = w[_idx(keep_out, w.device)]
        if keep_in is not None:
            w = w[:, _idx(keep_in, w.device)]
        cout, cin, groups = w.shape[0], w.shape[1], 1
        bias_keep = keep_out
    new = type(m)(cin, cout, m.kernel_size, m.stride, m.padding, m.dilation, groups,
                  m.bias is not None, m.padding_mode, device=w.device, dtype=w.dtype)
    return _filled(new, m, w, bias_keep)


def shrink_linear(m: nn.Linear, keep_in: list[int] | None, keep_out: list[int] | None) -> nn.Linear:
    w = m.weight.detach()
    if keep_out is not None:
        w = w[_idx(keep_out, w.device)]
    if keep_in is not None:
        w = w[:, _idx(keep_in, w.device)]
    new = nn.Linear(w.shape[1], w.shape[0], m.bias is not None, device=w.device, dtype=w.dtype)
    return _filled(new, m, w, keep_out)


def _filled(new: nn.Module, old: nn.Module, w: torch.Tensor, bias_keep: list[int] | None) -> nn.Module:
    """``new`` (a smaller conv/linear) holding the kept weights ``w`` and the kept entries of ``old``'s
    bias, in ``old``'s train/eval mode."""
    with torch.no_grad():
        new.weight.copy_(w)
        if old.bias is not None:
            b = old.bias.detach()
            new.bias.copy_(b[_idx(bias_keep, b.device)] if bias_keep is not None else b)
    new.train(old.training)
    return new


def shrink_batchnorm(m: nn.Module, keep_in: list[int] | None, keep_out: list[int] | None) -> nn.Module:
    keep = keep_out if keep_out is not None else keep_in
    if keep is None:
        return m
    new = type(m)(len(keep), m.eps, m.momentum, m.affine, m.track_running_stats)
    ref = m.weight if m.affine else m.running_mean
    new = new.to(device=ref.device, dtype=ref.dtype)
    i = _idx(keep, ref.device)
    with torch.no_grad():
        if m.affine:
            new.weight.copy_(m.weight[i])
            new.bias.copy_(m.bias[i])
        if m.track_running_stats:
            new.running_mean.copy_(m.running_mean[i])
            new.running_var.copy_(m.running_var[i])
            new.num_batches_tracked.copy_(m.num_batches_tracked)
    new.train(m.training)
    return new
