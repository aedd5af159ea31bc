"""Name → object registries (models, criteria, formats, methods), with helpful unknown-name errors."""

from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterator, TypeVar

from efficientml.core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named registry. ``@REG.register("name")`` adds an entry; ``REG.get("name")`` finds it."""

    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Any:
        def add(o: T) -> T:
            key = name.lower()
            if key in self._items:
                raise ConfigError(f"{self.what} {name!r} is already registered")
            self._items[key] = o
            return o

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        key = name.lower()
        if key not in self._items:
            close = difflib.get_close_matches(key, self._items, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown {self.what} {name!r}{hint}; expected one of {', '.join(self.names())}"
            )
        return self._items[key]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


def build(registry: Registry[Callable[..., T]], name: str, **kwargs: Any) -> T:
    return registry.get(name)(**kwargs)
