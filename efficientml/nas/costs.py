"""Analytical cost of any network of an :class:`~efficientml.nas.space.MBSpace`: parameters, MACs and
peak activation memory from the architecture alone (no model built, no forward pass), in the
definitions of :mod:`efficientml.analysis` — so for the extracted :class:`~efficientml.nas.subnet.MBNet`
they equal ``analysis.profile`` exactly (tested over random subnets).

The schedule is the plain model's executed steps: every conv and BatchNorm writes a new buffer,
``ReLU6(inplace=True)`` and eval-mode Dropout write none, a residual block keeps its input live until
its add (which writes a new buffer), the global pool writes ``C`` elements and the classifier its logits.
A buffer is live from the step that writes it (the model input: from step 0) to the last step that
reads it (the model output: to the end); the peak is the largest sum of live buffers over the steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from efficientml.nas.space import Arch, MBSpace


@dataclass
class Step:
    name: str
    macs: int
    reads: list[int]             # buffer ids
    writes: int | None           # a new buffer id, or None (in place / alias)


@dataclass
class SubnetCost:
    """What the predictors give for one architecture (batch 1)."""

    params: int
    macs: int
    peak_elements: int
    peak_step: str
    steps: list[Step] = field(default_factory=list, repr=False)
    live_elements: list[int] = field(default_factory=list, repr=False)

    def peak_bytes(self, bits: int = 8) -> float:
        return self.peak_elements * bits / 8

    def to_dict(self) -> dict:
        return {"params": self.params, "macs": self.macs, "peak_elements": self.peak_elements,
                "peak_bytes_int8": self.peak_bytes(8), "peak_step": self.peak_step}


class _Schedule:
    """Buffers and steps as the plain model runs them."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.steps: list[Step] = []
        self.params = 0

    def buffer(self, elements: int) -> int:
        self.sizes.append(elements)
        return len(self.sizes) - 1

    def op(self, name: str, reads: list[int], out_elements: int | None, macs: int = 0) -> int:
        out = None if out_elements is None else self.buffer(out_elements)
        self.steps.append(Step(name, macs, reads, out))
        return reads[0] if out is None else out

    def conv_bn(self, name: str, x: int, c_in: int, c_out: int, hw: tuple[int, int], k: int, stride: int,
                groups: int, relu: bool, bn_name: str | None = None) -> tuple[int, tuple[int, int]]:
        """Conv2d (no bias, padding (k−1)//2) → BatchNorm2d (→ ReLU6 in place); returns (buffer, (H, W))."""
        p = (k - 1) // 2
        h, w = ((hw[0] + 2 * p - k) // stride + 1, (hw[1] + 2 * p - k) // stride + 1)
        per_out = k * k * (c_in // groups)
        self.params += per_out * c_out + 2 * c_out
        y = self.op(f"{name}.0" if bn_name is None else name, [x], c_out * h * w, macs=per_out * c_out * h * w)
        y = self.op(bn_name or f"{name}.1", [y], c_out * h * w)
        if relu:
            y = self.op(f"{name}.2", [y], None)
        return y, (h, w)


def _liveness(sched: _Schedule, output: int) -> tuple[list[int], int]:
    n = len(sched.steps)
    born = {0: 0}  # buffer 0 is the model input
    last = {0: 0}
    for i, st in enumerate(sched.steps):
        for b in st.reads:
            last[b] = max(last.get(b, i), i)
        if st.writes is not None:
            born[st.writes] = i
            last[st.writes] = max(last.get(st.writes, i), i)
    last[output] = n - 1
    live = [0] * n
    for b, i0 in born.items():
        for i in range(i0, last[b] + 1):
            live[i] += sched.sizes[b]
    return live, max(range(n), key=lambda i: live[i])


def subnet_cost(space: MBSpace, arch: Arch) -> SubnetCost:
    """Parameters, MACs and the peak activation memory of ``MBNet(space, arch)`` on one
    ``(1, in_channels, resolution, resolution)`` input (module docstring)."""
    space.check(arch)
    s = _Schedule()
    hw = (arch.resolution, arch.resolution)
    x = s.buffer(space.in_channels * hw[0] * hw[1])
    c = space.stem_channels(arch.width)
    x, hw = s.conv_bn("features.0", x, space.in_channels, c, hw, 3, space.stem_stride, 1, True)
    for i, (_, c_in, c_out, stride, expand, k) in enumerate(space.blocks(arch), start=1):
        pre, hidden, j = f"features.{i}.conv", int(round(c_in * expand)), 0
        y, hw_in = x, hw
        if expand != 1:
            y, hw = s.conv_bn(f"{pre}.0", y, c_in, hidden, hw, 1, 1, 1, True)
            j = 1
        y, hw = s.conv_bn(f"{pre}.{j}", y, hidden, hidden, hw, k, stride, hidden, True)
        y, hw = s.conv_bn(f"{pre}.{j + 1}", y, hidden, c_out, hw, 1, 1, 1, False, bn_name=f"{pre}.{j + 2}")
        if stride == 1 and c_in == c_out and hw == hw_in:
            y = s.op("add", [x, y], c_out * hw[0] * hw[1])
        x, c = y, c_out
    head = space.head_channels(arch.width)
    x, hw = s.conv_bn(f"features.{len(list(space.blocks(arch))) + 1}", x, c, head, hw, 1, 1, 1, True)
    x = s.op("mean", [x], head)
    x = s.op("classifier.0", [x], None)
    s.params += head * space.num_classes + space.num_classes
    out = s.op("classifier.1", [x], space.num_classes, macs=head * space.num_classes)
    live, peak = _liveness(s, out)
    return SubnetCost(s.params, sum(st.macs for st in s.steps), live[peak], s.steps[peak].name, s.steps, live)
