"""The fp32 matrix-vector kernel for decoding on CPU (``csrc/gemv_f32.c``): one input row (batch-1
decoding) or a few (up to :data:`MAX_ROWS`: a small batch of sequences, a short prompt), every weight
read from memory once for all of them.

A batch-1 decode step is a chain of matrix-vector products that stream every weight from memory
once. MKL's sgemv stays well below the machine's read bandwidth on SmolLM2's shapes (576×576 to
576×49152), more so on the small ones; the kernel here gets closer on the same chain
(``benchmarks/llm_core.py`` records both against the measured bandwidth), because each thread
streams one contiguous block of rows and prefetches ahead of it.

The C source is compiled on first use with the system C compiler (``$CC``, else ``cc``, ``gcc``,
``clang``) for this CPU (``-march=native``, OpenMP) into ``$EFFICIENTML_CACHE/kernels`` (written
atomically, keyed by source, flags and CPU), then loaded with ``ctypes``. Without a compiler,
:func:`available` is False, :func:`status` says why, and callers fall back to ``F.linear``.
``EFFICIENTML_CPU_GEMV=0`` turns the kernel off.

:func:`gemv` is also the op ``torch.ops.efficientml.gemv_f32`` so a ``torch.compile``-d decode step
calls it directly (an opaque extern call in the graph); eager calls go straight to the kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from efficientml.core.errors import ShapeError
from efficientml.core.serialization import atomic_path
from efficientml.llm.kernels import gemv_op

SOURCE = Path(__file__).with_name("csrc") / "gemv_f32.c"
SYMBOL = "efficientml_gemv_f32"
MAX_ROWS = 8  # input rows per call; more go to BLAS's GEMM (compute-bound there, as it should be)
# tried in order; the first that builds wins (no OpenMP: one thread; no -march=native: portable code)
FLAG_SETS = (
    ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp"),
    ("-O3", "-ffp-contract=off", "-fopenmp"),
    ("-O3", "-march=native", "-ffp-contract=off"),
    ("-O3", "-ffp-contract=off"),
)

_lock = threading.Lock()
_state: dict[str, object] = {}  # "fn": the ctypes function or None, "status": one line


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


class _BuildFailed(Exception):
    """One flag set did not compile (the next one is tried)."""


def open_library(source: Path) -> tuple[ctypes.CDLL | None, str]:
    """Build ``source`` (cached) and load it: ``(library, "compiler flags; path")``, or ``(None, "off (why)")``
    (``EFFICIENTML_CPU_GEMV=0``, no compiler, a build error). What every CPU kernel module here loads with."""
    if os.environ.get("EFFICIENTML_CPU_GEMV", "1") == "0":
        return None, "off (EFFICIENTML_CPU_GEMV=0)"
    if (cc := _compiler()) is None:
        return None, "off (no C compiler found: set CC or install gcc/clang)"
    from efficientml.core.paths import cache_dir

    try:
        lib, flags = _build_any(cc, cache_dir() / "kernels", source)
        return ctypes.CDLL(str(lib)), f"{Path(cc).name} {' '.join(flags)}; {lib}"
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"off (could not build {source.name} with {cc}: {e})"


def bind(dll: ctypes.CDLL, name: str, argtypes: list, restype=ctypes.c_int):
    """The library's function ``name`` with its C signature."""
    f = getattr(dll, name)
    f.argtypes, f.restype = argtypes, restype
    return f


def _load() -> object:
    if "fn" in _state:  # built (or refused) already: no lock on the decode path
        return _state["fn"]
    with _lock:
        if "fn" in _state:
            return _state["fn"]
        fn, status = None, f"off (torch {torch.__version__} has no torch.library.register_fake; needs ≥ 2.4)"
        if hasattr(torch.library, "register_fake"):
            dll, status = open_library(SOURCE)
            if dll is not None:
                fn = bind(dll, SYMBOL, [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int], None)
                status = f"on ({status})"
        _state["fn"], _state["status"] = fn, status
        return fn


def _local_includes(source: Path) -> list[Path]:
    """The ``#include "…"`` files beside ``source`` (part of the cache key: a header change rebuilds)."""
    names = re.findall(r'^\s*#\s*include\s+"([^"]+)"', source.read_text(), flags=re.M)
    return [source.with_name(n) for n in names if source.with_name(n).is_file()]


def _build_any(cc: str, out_dir: Path, source: Path = SOURCE) -> tuple[Path, tuple[str, ...]]:
    """Build ``source`` with the first flag set the compiler accepts (cached per source, flags and CPU)."""
    src = source.read_bytes() + b"".join(h.read_bytes() for h in _local_includes(source))
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([src, cc.encode(), " ".join(flags).encode(), _cpu_id().encode()]))
        lib = out_dir / f"{source.stem}-{key.hexdigest()[:16]}.so"
        if lib.is_file():
            return lib, flags
        try:
            with atomic_path(lib) as tmp:
                r = subprocess.run([cc, *flags, "-shared", "-fPIC", str(source), "-o", str(tmp)],
                                   capture_output=True, text=True, timeout=120)
                if r.returncode != 0:
                    last = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
                    raise _BuildFailed(f"[{' '.join(flags)}] {last}")
        except _BuildFailed as e:
            errors.append(str(e))
            continue
        return lib, flags
    raise RuntimeError("; ".join(errors))


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call)."""
    return _load() is not None


def status() -> str:
    """One line: on (compiler, flags, library) or off (why)."""
    _load()
    return str(_state["status"])


def eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``F.linear(x, weight, bias)`` can run on the kernel: 1 to :data:`MAX_ROWS` fp32 CPU
    rows and an fp32 contiguous (out, in) weight (:func:`gemv_op.fits`). (Whether the kernel is built
    is :func:`available`'s question, asked once by whoever turns it on.)"""
    return x.device.type == "cpu" and x.dtype == torch.float32 and gemv_op.fits(x, weight, bias, MAX_ROWS)


def _gemv_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    fn = _load()
    if fn is None:
        raise RuntimeError(f"the CPU matrix-vector kernel is {status()}")
    out_f, in_f = gemv_op.check(x, weight, bias, MAX_ROWS)
    if x.dtype != torch.float32:
        raise ShapeError(f"gemv is fp32 only, got {x.dtype}")
    xc = x.contiguous()
    b = None if bias is None else bias.contiguous()
    y = torch.empty(*x.shape[:-1], out_f, dtype=torch.float32)
    fn(weight.data_ptr(), xc.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
       x.numel() // in_f, out_f, in_f, torch.get_num_threads())
    return y


_op = gemv_op.register("gemv_f32", _gemv_impl)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for 1 to :data:`MAX_ROWS` fp32 rows ``x`` (…, in) on the kernel
    → (…, out).
    Raises if the kernel is off (see :func:`status`) or the inputs are not :func:`eligible`."""
    return _op(x, weight, bias)
