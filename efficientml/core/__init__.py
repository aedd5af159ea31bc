"""Shared machinery: errors, configs, registries, module surgery, devices, safe serialization."""

from efficientml.core.config import Config
from efficientml.core.errors import (
    CheckpointError,
    ConfigError,
    DataNotFoundError,
    EfficientMLError,
    ShapeError,
    UnsupportedError,
)
from efficientml.core.registry import Registry

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataNotFoundError",
    "EfficientMLError",
    "Registry",
    "ShapeError",
    "UnsupportedError",
]
