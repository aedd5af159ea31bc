"""Optional dependencies are imported where they are used, with a message naming the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from efficientml.core.errors import UnsupportedError


def optional_import(module: str, extra: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise an error saying which ``pip install efficientml[extra]`` adds it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        why = f" (needed for {purpose})" if purpose else ""
        raise UnsupportedError(
            f"the optional package {module.split('.')[0]!r} is not installed{why}; "
            f"install it with: pip install 'efficientml[{extra}]'"
        ) from e
