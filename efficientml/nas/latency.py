"""A latency lookup table measured on this machine, per op of the space, and the latency it predicts
for a whole network (the sum of its ops).

The ops are the plain model's pieces, each timed alone as a module on a random input of its shape
(batch 1, eval mode, ``torch.inference_mode``, the given thread count): the stem at a resolution, every
distinct inverted bottleneck ``(c_in, c_out, stride, expand, kernel, input size)``, and the head
(1×1 conv, global pool, classifier) at its input size. A subnet's raw prediction is the sum of its
ops' medians. Ops timed alone run with warm caches and no neighbours, so the sum is biased (here it
under-predicts whole networks by a similar fraction for every size); :meth:`LatencyTable.calibrate` fits
``measured ≈ scale · sum + offset`` by least squares on a few measured subnets (the table's own
correction, kept in the file) and :meth:`LatencyTable.predict` applies it. :func:`lut_error` compares
predictions with the end-to-end measured median of the whole model, on subnets the fit did not see.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from efficientml.analysis.latency import measure_latency
from efficientml.models.mobilenetv2 import ConvBNReLU, InvertedResidual
from efficientml.nas.costs import subnet_cost
from efficientml.nas.space import Arch, MBSpace
from efficientml.nas.subnet import build_subnet


class _Head(nn.Module):
    def __init__(self, c: int, head: int, classes: int):
        super().__init__()
        self.conv, self.fc = ConvBNReLU(c, head, 1), nn.Linear(head, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def _hw(h: int, k: int, s: int) -> int:
    return (h + 2 * ((k - 1) // 2) - k) // s + 1


def op_keys(space: MBSpace, arch: Arch) -> list[tuple]:
    """The ops of ``arch``'s network as table keys, in order."""
    h = arch.resolution
    keys: list[tuple] = [("stem", space.in_channels, space.stem_channels(arch.width), h)]
    h = _hw(h, 3, space.stem_stride)
    c = space.stem_channels(arch.width)
    for _, c_in, c_out, stride, expand, k in space.blocks(arch):
        keys.append(("mb", c_in, c_out, stride, float(expand), k, h))
        h, c = _hw(h, k, stride), c_out
    keys.append(("head", c, space.head_channels(arch.width), space.num_classes, h))
    return keys


def _op_module(space: MBSpace, key: tuple) -> tuple[nn.Module, torch.Tensor]:
    if key[0] == "stem":
        _, c_in, c_out, h = key
        return ConvBNReLU(c_in, c_out, 3, space.stem_stride), torch.randn(1, c_in, h, h)
    if key[0] == "mb":
        _, c_in, c_out, stride, expand, k, h = key
        return InvertedResidual(c_in, c_out, stride, expand, k), torch.randn(1, c_in, h, h)
    _, c, head, classes, h = key
    return _Head(c, head, classes), torch.randn(1, c, h, h)


@dataclass
class LatencyTable:
    """op key → median milliseconds (module docstring); ``threads`` and ``device`` as measured."""

    space: MBSpace
    threads: int
    entries: dict[tuple, float] = field(default_factory=dict)
    device: str = "cpu"
    scale: float = 1.0       # the calibration: predict = scale · (sum of the ops) + offset_ms
    offset_ms: float = 0.0

    def raw(self, arch: Arch) -> float:
        """The sum of ``arch``'s ops (ms); an op missing from the table is measured and added."""
        missing = [k for k in op_keys(self.space, arch) if k not in self.entries]
        if missing:
            self.measure(missing)
        return sum(self.entries[k] for k in op_keys(self.space, arch))

    def predict(self, arch: Arch) -> float:
        """Predicted latency (ms) of ``arch``: the calibrated sum of its ops."""
        return self.scale * self.raw(arch) + self.offset_ms

    def calibrate(self, archs: list[Arch], warmup: int = 10, runs: int = 30) -> dict:
        """Fit ``scale`` and ``offset_ms`` (least squares) so predictions match the measured end-to-end
        latency of ``archs``; returns the fit and its points."""
        pts = [(self.raw(a), _measure_net(self, a, warmup, runs)) for a in archs]
        n = len(pts)
        mx, my = sum(p for p, _ in pts) / n, sum(m for _, m in pts) / n
        sxx = sum((p - mx) ** 2 for p, _ in pts)
        self.scale = sum((p - mx) * (m - my) for p, m in pts) / sxx if n > 1 and sxx > 0 else my / mx
        self.offset_ms = my - self.scale * mx if n > 1 and sxx > 0 else 0.0
        return {"subnets": n, "scale": self.scale, "offset_ms": self.offset_ms,
                "points": [{"sum_ms": p, "measured_ms": m} for p, m in pts]}

    __call__ = predict

    def measure(self, keys: list[tuple], warmup: int = 10, runs: int = 30) -> None:
        for key in keys:
            if key in self.entries:
                continue
            mod, x = _op_module(self.space, key)
            self.entries[key] = measure_latency(mod.eval(), x, warmup=warmup, runs=runs,
                                                threads=self.threads).median_ms

    def to_dict(self) -> dict:
        return {"space": self.space.to_dict(), "threads": self.threads, "device": self.device,
                "scale": self.scale, "offset_ms": self.offset_ms,
                "entries": [[list(k), v] for k, v in self.entries.items()]}

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyTable":
        return cls(MBSpace.from_dict(d["space"]), d["threads"], {tuple(k): v for k, v in d["entries"]},
                   d.get("device", "cpu"), d.get("scale", 1.0), d.get("offset_ms", 0.0))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        return cls.from_dict(json.loads(Path(path).read_text()))


def all_op_keys(space: MBSpace) -> list[tuple]:
    """Every op any network of the space can run (the full table)."""
    keys: set[tuple] = set()
    for r in space.resolutions:
        for w in space.widths:
            for k in space.kernels:
                for e in space.expands:
                    a = space.largest(resolution=r, width=w)
                    a = Arch(r, w, a.depths, (k,) * space.n_slots, (e,) * space.n_slots)
                    keys.update(op_keys(space, a))
                    for d in range(1, max(d for _, d, _ in space.stages) + 1):  # heads after shorter last stages
                        depths = tuple(max(lo, min(d, dm)) for lo, (_, dm, _) in zip(space.min_depths, space.stages))
                        keys.update(op_keys(space, Arch(r, w, depths, a.kernels, a.expands)))
    return sorted(keys, key=str)


def build_lut(space: MBSpace, threads: int = 2, warmup: int = 10, runs: int = 30) -> LatencyTable:
    """Measure every op of the space on this machine (``efficientml search build-lut``)."""
    t = LatencyTable(space, threads)
    t.measure(all_op_keys(space), warmup, runs)
    return t


def _measure_net(table: LatencyTable, a: Arch, warmup: int, runs: int) -> float:
    net = build_subnet(table.space, a).eval()
    x = torch.randn(1, table.space.in_channels, a.resolution, a.resolution)
    return measure_latency(net, x, warmup=warmup, runs=runs, threads=table.threads).median_ms


def lut_error(table: LatencyTable, archs: list[Arch], warmup: int = 10, runs: int = 30) -> dict:
    """Predicted (calibrated) and raw (sum of ops) vs measured end-to-end median latency of each arch's
    plain model: the mean absolute percentage errors and the rows."""
    rows = []
    for a in archs:
        meas = _measure_net(table, a, warmup, runs)
        raw, pred = table.raw(a), table.predict(a)
        rows.append({"key": a.key(), "macs": subnet_cost(table.space, a).macs, "measured_ms": meas,
                     "sum_ms": raw, "predicted_ms": pred, "abs_pct_error": abs(pred - meas) / meas,
                     "raw_abs_pct_error": abs(raw - meas) / meas})
    n = max(1, len(rows))
    return {"mape": sum(r["abs_pct_error"] for r in rows) / n,
            "raw_mape": sum(r["raw_abs_pct_error"] for r in rows) / n, "rows": rows}
