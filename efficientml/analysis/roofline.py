"""The roofline model: is a layer limited by compute or by memory traffic on a given machine?

Arithmetic intensity is FLOPs per byte moved, with 1 MAC = 2 FLOPs. A machine with peak ``P`` FLOP/s
and memory bandwidth ``B`` bytes/s attains at most ``min(P, I·B)`` at intensity ``I``; below the ridge
point ``P / B`` a layer is memory-bound. A layer's bytes are its weights plus the activations it
reads and writes, each at ``bits`` per element (no cache reuse across layers is assumed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from efficientml.core.errors import ConfigError


@dataclass(frozen=True)
class Roofline:
    peak_flops: float        # FLOP/s
    bandwidth: float         # bytes/s

    def __post_init__(self) -> None:
        if self.peak_flops <= 0 or self.bandwidth <= 0:
            raise ConfigError(f"peak_flops and bandwidth must be positive, got {self.peak_flops} "
                              f"and {self.bandwidth}")

    @property
    def ridge_point(self) -> float:
        """The intensity (FLOP/byte) where memory-bound turns into compute-bound."""
        return self.peak_flops / self.bandwidth

    def attainable(self, intensity: float) -> float:
        return min(self.peak_flops, intensity * self.bandwidth)

    def bound(self, intensity: float) -> str:
        return "memory" if intensity < self.ridge_point else "compute"


def arithmetic_intensity(macs: int, bytes_moved: float) -> float:
    """FLOPs per byte: ``2·macs / bytes_moved``."""
    if bytes_moved <= 0:
        raise ConfigError(f"bytes moved must be positive, got {bytes_moved}")
    return 2 * macs / bytes_moved


def flops_utilization(macs: int, seconds: float, peak_flops: float) -> float:
    """Achieved FLOP/s as a fraction of peak (MFU)."""
    return 2 * macs / seconds / peak_flops


def bandwidth_utilization(bytes_moved: float, seconds: float, bandwidth: float) -> float:
    """Achieved bytes/s as a fraction of the memory bandwidth."""
    return bytes_moved / seconds / bandwidth


@dataclass(frozen=True)
class LayerRoofline:
    name: str
    macs: int
    bytes: float
    intensity: float
    attainable_flops: float
    bound: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def layer_rooflines(profile: Any, roof: Roofline, bits: int = 32) -> list[LayerRoofline]:
    """Intensity and bound of every layer of a :class:`ModelProfile` that does MACs."""
    out = []
    for l in profile.layers:
        if not l.macs:
            continue
        nbytes = (l.params + l.input_elements + l.output_elements) * bits / 8
        i = arithmetic_intensity(l.macs, nbytes)
        out.append(LayerRoofline(l.name, l.macs, nbytes, i, roof.attainable(i), roof.bound(i)))
    return out
