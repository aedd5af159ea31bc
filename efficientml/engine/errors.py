"""The engine's error: an op of the integer program that the engine (or its C generator) does not
implement. It names the op and its layer, and derives from the project's :class:`UnsupportedError`
(so ``except NotImplementedError`` keeps working)."""

from __future__ import annotations

from efficientml.core.errors import EfficientMLError, UnsupportedError


class EngineUnsupportedError(UnsupportedError):
    """An integer-program step the engine has no kernel for (the message names the op and layer)."""

    def __init__(self, op: str, layer: str, why: str = ""):
        self.op, self.layer = op, layer
        tail = f": {why}" if why else ""
        super().__init__(f"the engine has no kernel for op {op!r} (layer {layer!r}){tail}")


class EngineBuildError(EfficientMLError, RuntimeError):
    """The generated C did not compile, link or run (the compiler's or emulator's last line is quoted)."""
