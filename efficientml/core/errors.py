"""Error types. Every error a user can cause is one of these, with one sentence that names what was
wrong and what was expected. The CLI prints the message without a traceback (``--debug`` shows it).

Each subclass also derives from the matching builtin, so ``except ValueError`` keeps working.
"""


class EfficientMLError(Exception):
    """Base class of every error efficientml raises on purpose."""


class ConfigError(EfficientMLError, ValueError):
    """A configuration or argument value is out of range or inconsistent."""


class ShapeError(EfficientMLError, ValueError):
    """A tensor or input has the wrong shape."""


class DataNotFoundError(EfficientMLError, FileNotFoundError):
    """A dataset, checkpoint or model file could not be found or fetched."""


class CheckpointError(EfficientMLError, ValueError):
    """A checkpoint or model file exists but is corrupt, truncated or of the wrong kind."""


class UnsupportedError(EfficientMLError, NotImplementedError):
    """An operation, layer type or architecture that efficientml does not handle."""


class OutputError(EfficientMLError, OSError):
    """An output cannot be written: its folder is read-only or full, its name too long, …"""
