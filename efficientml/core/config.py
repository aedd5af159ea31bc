"""Frozen dataclass configs that validate themselves and round-trip through JSON.

A technique is a ``Config`` subclass plus one handler registered for it
(:func:`efficientml.core.transform.register_transform`); the config is written into every report so
a run can be repeated from it. Every subclass has its own ``kind`` (the ``__kind__`` key of its
JSON), and ``from_dict`` refuses a dict of another kind.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, TypeVar

from efficientml.core.errors import ConfigError

T = TypeVar("T", bound="Config")


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class: subclasses are ``@dataclass(frozen=True)`` and override :meth:`validate`."""

    kind: ClassVar[str] = "config"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # overridden by subclasses
        """Raise :class:`ConfigError` with a clear sentence when a field is out of range."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["__kind__"] = type(self).kind
        return d

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        """Build from :meth:`to_dict`'s output; a ``__kind__`` that is not this class's is an error."""
        kind = d.get("__kind__", cls.kind)
        if kind != cls.kind:
            raise ConfigError(f"{cls.__name__}.from_dict got a config of kind {kind!r}; expected kind "
                              f"{cls.kind!r} (the dict was written by another config type)")
        d = {k: v for k, v in d.items() if k != "__kind__"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"{cls.__name__} got unknown field(s) {unknown}; expected some of {sorted(names)}"
            )
        for f in dataclasses.fields(cls):  # JSON turns tuples into lists
            if f.name in d and isinstance(d[f.name], list) and "tuple" in str(f.type):
                nested = str(f.type).count("tuple") > 1  # e.g. tuple[tuple[int, int], ...]
                d[f.name] = tuple(tuple(v) if nested and isinstance(v, list) else v for v in d[f.name])
        return cls(**d)

    @classmethod
    def from_json(cls: type[T], s: str) -> T:
        return cls.from_dict(json.loads(s))


def check_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False,
                hi_open: bool = False) -> None:
    """Raise ConfigError unless ``value`` lies in the interval; the message shows the interval."""
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ConfigError(f"{name} must be in {interval}, got {value!r}")


def check_choice(name: str, value: Any, choices: Any) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {sorted(choices)}, got {value!r}")
