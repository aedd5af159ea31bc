"""The cache folder: downloads, compiled kernels and other files that can be rebuilt.

``EFFICIENTML_CACHE`` if set, else ``~/.cache/efficientml``. It lives in core because every layer
caches something (datasets and pretrained weights in ``data``/``models``, compiled C kernels in
``llm.kernels``), and none of them should import another layer just to find the folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root (not created here; writers create the subfolder they need)."""
    return Path(os.environ.get("EFFICIENTML_CACHE", Path.home() / ".cache" / "efficientml"))


def require_file(path: str | os.PathLike, what: str = "file", error: type[Exception] | None = None) -> Path:
    """``path`` as a Path if it is a regular file; else one sentence saying what it is instead (missing,
    a folder, a FIFO or device) — a folder is not "does not exist"."""
    import stat

    from efficientml.core.errors import CheckpointError

    err = error or CheckpointError
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise err(f"{what} {str(p)!r} does not exist") from None
    except OSError as e:
        raise err(f"{what} {str(p)!r} cannot be read ({e.strerror})") from None
    if stat.S_ISREG(mode):
        return p
    kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
    raise err(f"{what} {str(p)!r} is {kind}; expected a file")
