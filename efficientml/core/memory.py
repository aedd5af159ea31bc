"""Give freed heap memory back to the operating system.

glibc keeps freed allocations below its mmap threshold (which grows up to 32 MB as large blocks are
freed) in its arenas; after a calibration block, tens of such tensors are free but still resident.
``release_memory()`` asks the allocator to return them (``malloc_trim``), so one block's scratch does
not add to the next block's peak. A no-op where the C library has no ``malloc_trim``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory() -> bool:
    """Return free heap pages to the OS; True if the allocator supports it."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
