"""Elastic layers of the once-for-all supernet: each holds the weights of its largest setting and runs
any smaller one by slicing (width) or transforming (kernel).

- :class:`DynamicPointwise`: a 1×1 conv whose first ``c_out`` filters over the first ``c_in`` input
  channels are used (channels are sorted by importance beforehand, so "first" means "most important").
- :class:`DynamicDepthwise`: a depthwise conv with elastic kernel. The largest kernel is stored; a
  smaller one is its centre, transformed by a learned ``k²×k²`` matrix per step down (7→5, 5→3,
  initialised to the identity, shared by the channels of the layer), as in OFA.
- :class:`DynamicBN`: BatchNorm over the first ``c`` channels (the running statistics are slices of
  the full buffers, updated in place in training).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class DynamicPointwise(nn.Module):
    def __init__(self, max_in: int, max_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_out, max_in, 1, 1))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")

    def active_weight(self, c_in: int, c_out: int) -> torch.Tensor:
        return self.weight[:c_out, :c_in]

    def forward(self, x: torch.Tensor, c_out: int) -> torch.Tensor:
        return F.conv2d(x, self.active_weight(x.shape[1], c_out))


class DynamicDepthwise(nn.Module):
    def __init__(self, max_channels: int, kernels: tuple[int, ...], stride: int):
        super().__init__()
        self.kernels = tuple(sorted(kernels))
        self.stride = stride
        kmax = self.kernels[-1]
        self.weight = nn.Parameter(torch.empty(max_channels, 1, kmax, kmax))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        self.transforms = nn.ParameterDict({
            f"{big}to{small}": nn.Parameter(torch.eye(small * small))
            for big, small in zip(self.kernels[::-1][:-1], self.kernels[::-1][1:])})

    def active_weight(self, channels: int, kernel: int) -> torch.Tensor:
        """(channels, 1, kernel, kernel): the centre of the stored kernel, transformed step by step."""
        if kernel not in self.kernels:
            raise ValueError(f"kernel {kernel} is not one of {self.kernels}")
        w = self.weight[:channels]
        for big, small in zip(self.kernels[::-1][:-1], self.kernels[::-1][1:]):
            if big == kernel:
                break
            lo = (big - small) // 2
            centre = w[:, :, lo:lo + small, lo:lo + small].reshape(channels, small * small)
            w = (centre @ self.transforms[f"{big}to{small}"]).reshape(channels, 1, small, small)
        return w

    def forward(self, x: torch.Tensor, kernel: int) -> torch.Tensor:
        c = x.shape[1]
        return F.conv2d(x, self.active_weight(c, kernel), None, self.stride, (kernel - 1) // 2, 1, c)


class DynamicBN(nn.Module):
    def __init__(self, max_channels: int, momentum: float | None = 0.1, eps: float = 1e-5):
        super().__init__()
        self.bn = nn.BatchNorm2d(max_channels, eps=eps, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, bn = x.shape[1], self.bn
        use_batch = bn.training or bn.running_mean is None  # the inner BN's mode: recalibrate_bn sets it
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.momentum is None:  # cumulative average (BN re-calibration)
            bn.num_batches_tracked += 1
            momentum = 1.0 / float(bn.num_batches_tracked)
        return F.batch_norm(x, bn.running_mean[:c], bn.running_var[:c], bn.weight[:c], bn.bias[:c],
                            use_batch, momentum, bn.eps)
