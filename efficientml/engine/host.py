"""Build and run a generated model on this machine.

:func:`compile_engine` lowers an integer model, plans its memory, generates the C and compiles it
with the system compiler (``$CC``, else ``cc``/``gcc``/``clang``) into
``$EFFICIENTML_CACHE/engine/<prefix>-<hash>.so``, keyed by the source, compiler and flags (written
atomically; a second build of the same model is a cache hit). The host build defines ``EML_HOST``:
im2col/1x1 GEMMs, padded-plane depthwise and Winograd F(2x2, 3x3) kernels (``csrc/eml_host.c``,
``eml_winograd.c``), with AVX2 / AVX-512 VNNI paths in functions carrying GCC target attributes
(``csrc/eml_x86.c``), so one ``-O3`` library without ``-march`` picks its path from the CPU's flags at
run time; ``EFFICIENTML_ENGINE_ISA`` (``portable``, ``avx2``, ``vnni``, ``auto``) or ``isa=`` forces
one. Threads are OpenMP (``-fopenmp`` when the compiler has it), ``num_threads`` of them (default:
``torch.get_num_threads()``). The library is loaded with ``ctypes``; :meth:`EngineModel.run`
quantizes float inputs with the model's own input step, runs one sample at a time and returns the
output codes, to compare with ``IntegerModel.integer_output``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from efficientml.core.errors import UnsupportedError
from efficientml.engine.codegen import generate_c, generate_header
from efficientml.engine.errors import EngineBuildError
from efficientml.engine.lower import lower
from efficientml.engine.planner import MemoryPlan, plan_memory
from efficientml.quant.integer import IntegerModel

HOST_FLAGS = ("-O3", "-std=c99", "-DEML_HOST", "-fno-strict-aliasing", "-Wall", "-Wno-unused-function",
              "-Werror=implicit-function-declaration")
OPENMP_FLAGS = ("-fopenmp",)
ISAS = {"portable": 0, "avx2": 1, "vnni": 2, "auto": -1}
ISA_NAMES = {v: k for k, v in ISAS.items()}


def host_compiler() -> str | None:
    """The C compiler to build with, or None."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@dataclass
class GeneratedModel:
    """The generated sources and the plan they were made from."""

    prefix: str
    c_source: str
    header: str
    plan: MemoryPlan

    def write(self, folder: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``<prefix>.c`` and ``<prefix>.h`` into ``folder``; returns their paths."""
        from efficientml.core.serialization import atomic_path

        out = Path(folder)
        paths = out / f"{self.prefix}.c", out / f"{self.prefix}.h"
        for path, text in zip(paths, (self.c_source, self.header)):
            with atomic_path(path) as tmp:
                tmp.write_text(text)
        return paths


def generate(im: IntegerModel, example: torch.Tensor, prefix: str = "model", inplace: bool = True,
             conv_algo: str | dict[str, str] = "auto") -> GeneratedModel:
    """Lower ``im`` for inputs shaped like ``example[:1]``, plan its arena and generate its C
    (``conv_algo``: the host build's 3x3 conv algorithm, see :func:`~efficientml.engine.codegen.generate_c`)."""
    plan = plan_memory(lower(im, example), inplace=inplace)
    return GeneratedModel(prefix, generate_c(plan, prefix, conv_algo), generate_header(plan, prefix), plan)


def _compile(cc: str, flags: tuple[str, ...], c_path: Path, lib: Path) -> str:
    """Compile into ``lib`` atomically; returns the compiler's last error line ("" on success)."""
    from efficientml.core.serialization import atomic_path

    try:
        with atomic_path(lib) as out:
            r = subprocess.run([cc, *flags, "-shared", "-fPIC", str(c_path), "-o", str(out)],
                               capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                raise EngineBuildError((r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1])
    except EngineBuildError as e:
        return str(e)
    return ""


def _build(gen: GeneratedModel, cc: str) -> Path:
    from efficientml.core.paths import cache_dir

    for flags in ((*HOST_FLAGS, *OPENMP_FLAGS), HOST_FLAGS):     # without OpenMP if the compiler lacks it
        key = hashlib.sha256(b"\0".join([gen.c_source.encode(), gen.header.encode(), cc.encode(),
                                         " ".join(flags).encode()])).hexdigest()[:16]
        lib = cache_dir() / "engine" / f"{gen.prefix}-{key}.so"
        if lib.is_file():
            return lib
        with tempfile.TemporaryDirectory(prefix="eml-engine-") as tmp:
            c_path, _ = gen.write(tmp)
            msg = _compile(cc, flags, c_path, lib)
        if not msg:
            return lib
    raise EngineBuildError(f"{Path(cc).name} could not build the generated {gen.prefix}.c: {msg}")


class EngineModel:
    """A generated model compiled for this machine and loaded with ctypes."""

    def __init__(self, im: IntegerModel, gen: GeneratedModel, library: Path, num_threads: int | None = None,
                 isa: str | None = None):
        self.im, self.generated, self.library = im, gen, library
        self._dll = ctypes.CDLL(str(library))
        self._fn = getattr(self._dll, f"{gen.prefix}_run")
        self._fn.argtypes, self._fn.restype = [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
        g = gen.plan.graph
        self.input_shape, self.output_shape = g.input.shape, g.output.shape
        self._set_isa, self._set_threads = self._control("set_isa"), self._control("set_threads")
        self.set_isa(isa)
        self.set_threads(num_threads)

    def _control(self, what: str) -> Any:
        fn = getattr(self._dll, f"{self.generated.prefix}_{what}")
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn

    def set_isa(self, isa: str | None = None) -> str:
        """Force a kernel path (``portable``, ``avx2``, ``vnni``; ``auto`` or None: ``$EFFICIENTML_ENGINE_ISA``,
        else the best the CPU has); a path the CPU lacks falls back to the best it has. Returns the path
        in use. (Models loaded from one cached library share its C state, so every run sets both again.)"""
        from efficientml.core.config import check_choice

        name = (isa or os.environ.get("EFFICIENTML_ENGINE_ISA") or "auto").lower()
        check_choice("engine ISA", name, tuple(ISAS))
        self._isa_code = self._set_isa(ISAS[name])
        self.isa = ISA_NAMES[self._isa_code]
        return self.isa

    def set_threads(self, n: int | None = None) -> int:
        """Threads of the OpenMP kernels (None: ``torch.get_num_threads()``); 1 without OpenMP."""
        self.num_threads = self._set_threads(int(n or torch.get_num_threads()))
        return self.num_threads

    @property
    def plan(self) -> MemoryPlan:
        return self.generated.plan

    def run_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Input codes (B, *input_shape[1:]) → output codes (B, *output_shape[1:]) as int32."""
        if tuple(codes.shape[1:]) != tuple(self.input_shape[1:]):
            from efficientml.core.errors import ShapeError

            raise ShapeError(f"the engine model takes inputs shaped (B, {', '.join(map(str, self.input_shape[1:]))}), "
                             f"got {tuple(codes.shape)}")
        x = codes.to(torch.uint8).contiguous()
        self._set_isa(self._isa_code)
        self._set_threads(self.num_threads)
        outs = []
        for b in range(x.shape[0]):
            y = torch.empty(self.output_shape, dtype=torch.uint8)
            rc = self._fn(x[b].data_ptr(), y.data_ptr())
            if rc != 0:
                raise EngineBuildError(f"{self.generated.prefix}_run returned {rc}")
            outs.append(y)
        return torch.cat(outs).to(torch.int32)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """Float inputs (B, …) → output codes, quantized by the integer model's own input step."""
        return self.run_codes(self.im.program.instrs[0].step.integer(x))


def compile_engine(im: IntegerModel, example: torch.Tensor, prefix: str = "model", inplace: bool = True,
                   num_threads: int | None = None, isa: str | None = None,
                   conv_algo: str | dict[str, str] = "auto") -> EngineModel:
    """Generate, compile (cached) and load ``im`` as C (``num_threads``, ``isa``: see
    :class:`EngineModel`; ``conv_algo``: "auto", "im2col", "winograd" or a dict by op name, for the
    3x3 stride-1 convs). Raises :class:`EngineUnsupportedError` for an op without a kernel,
    :class:`UnsupportedError` without a C compiler, :class:`EngineBuildError` when the compiler fails."""
    gen = generate(im, example, prefix, inplace, conv_algo)
    cc = host_compiler()
    if cc is None:
        raise UnsupportedError("no C compiler found to build the engine's C (set CC or install gcc/clang)")
    return EngineModel(im, gen, _build(gen, cc), num_threads, isa)
