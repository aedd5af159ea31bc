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
