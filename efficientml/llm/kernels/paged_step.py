"""The serving engine's CPU step driven from C (``csrc/decode_paged.c``): ragged rows — decodes, the
k + 1 positions of a speculative verify, short prefill chunks — each at its own position, attending to
its own sequence's keys through its block table in the engine's block pool, every block run with no
torch op in between (the batch-1 :mod:`~efficientml.llm.kernels.native_step` for many sequences).

The products are the project's kernels with M = rows (one pass over each weight for the whole step);
norms, RoPE, attention and activations are fp32; new keys and values are written into the pool in its
dtype (fp32, bf16, fp16). :func:`why_not` says in one line why a model or pool cannot take it (what
``native_step.model_why_not`` refuses, a GPU or integer pool); the engine then runs its eager forward.

    step = PagedStep(model, blocks, max_model_len)
    logits = step(tokens, positions, tables, out_rows)   # (len(out_rows), vocab)
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch
from torch import nn

from efficientml.llm.kernels import cpu_gemv, native_step

SOURCE = Path(__file__).with_name("csrc") / "decode_paged.c"

_lock = threading.Lock()
_state: dict[str, object] = {}


class _Batch(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int64), ("tokens", ctypes.c_void_p), ("pos", ctypes.c_void_p),
                ("table", ctypes.c_void_p), ("max_blocks", ctypes.c_int64), ("block_size", ctypes.c_int64),
                ("rope_len", ctypes.c_int64), ("n_out", ctypes.c_int64), ("out_rows", ctypes.c_void_p)]


def _load():
    """(step, work-size function, kernel addresses) or None; ``_state["status"]`` says why."""
    if "lib" in _state:
        return _state["lib"]
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib, status = None, ""
        base = native_step._load()
        if base is None:
            status = f"off (the native decode step is {native_step.status()})"
        else:
            dll, status = cpu_gemv.open_library(SOURCE)
            if dll is not None:
                model_p = ctypes.POINTER(native_step._Model)
                step = cpu_gemv.bind(dll, "efficientml_paged_step",
                                     [model_p, ctypes.POINTER(_Batch), ctypes.c_void_p, ctypes.c_int])
                work = cpu_gemv.bind(dll, "efficientml_paged_work_floats", [model_p, ctypes.c_int64],
                                     ctypes.c_int64)
                lib = (step, work, base[2])
                status = f"on ({status})"
        _state.update(lib=lib, status=status)
        return lib


def status() -> str:
    _load()
    return str(_state["status"])


def why_not(model: nn.Module, pool_k: torch.Tensor) -> str | None:
    """None when the paged step can run ``model`` over a pool whose keys are ``pool_k``, else one line why."""
    if _load() is None:
        return f"the paged step is {status()}"
    if pool_k.device.type != "cpu" or pool_k.dtype not in native_step.DTYPES:
        return f"the KV pool is {pool_k.dtype} on {pool_k.device.type} (the paged step writes fp32/bf16/fp16 on CPU)"
    if pool_k.dtype == torch.float16 and not native_step.cpu_gemv16._state.get("f16"):
        return "an fp16 pool, and the compiler has no _Float16"
    why = native_step.model_why_not(model)
    if why:
        return why
    if model.model.rope.dynamic:
        return "dynamic RoPE scaling (it adapts to each sequence's length)"
    return None


class PagedStep:
    """``step(tokens, positions, tables, out_rows) → logits (len(out_rows), vocab)`` for one model over
    one block pool (``blocks.k`` / ``blocks.v``: (layers, num_blocks, block_size, n_kv, hd))."""

    def __init__(self, model: nn.Module, blocks, max_model_len: int) -> None:
        why = why_not(model, blocks.k)
        if why:
            raise ValueError(why)
        self.fn, self.work_floats, fns = _load()
        self.model, self.blocks, self.rope_len = model, blocks, max_model_len
        self.keep: list = []
        slots = blocks.num_blocks * blocks.block_size
        self.m = native_step.model_struct(model, slots, max_model_len, fns, self.keep)
        self.m.cache_dtype, self.m.kv_g = native_step.DTYPES[blocks.k.dtype], 1
        self.m.kcache, self.m.vcache = blocks.k.data_ptr(), blocks.v.data_ptr()
        self.work = torch.empty(0, dtype=torch.float32)

    def __call__(self, tokens: list[int], positions: list[int], tables: list[list[int]],
                 out_rows: list[int]) -> torch.Tensor:
        """Row i is token ``tokens[i]`` at ``positions[i]`` of the sequence whose block table is
        ``tables[i]``; logits for the rows ``out_rows`` (ascending)."""
        n = len(tokens)
        need = self.work_floats(ctypes.byref(self.m), n)
        if self.work.numel() < need:
            self.work = torch.empty(need, dtype=torch.float32)
            self.m.work = self.work.data_ptr()
        mb = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (mb - len(t)) for t in tables], dtype=torch.int64)  # padding unread
        tok = torch.tensor(tokens, dtype=torch.int64)
        pos = torch.tensor(positions, dtype=torch.int64)
        rows = torch.tensor(out_rows, dtype=torch.int64)
        b = _Batch(n, tok.data_ptr(), pos.data_ptr(), table.data_ptr(), mb, self.blocks.block_size, self.rope_len,
                   len(out_rows), rows.data_ptr())
        logits = torch.empty(len(out_rows), self.m.vocab, dtype=torch.float32)
        rc = self.fn(ctypes.byref(self.m), ctypes.byref(b), logits.data_ptr(), torch.get_num_threads())
        if rc == -2:
            raise IndexError("a token, position or block id of the step is outside the model or the pool")
        if rc != 0:
            raise MemoryError("the paged step could not allocate a kernel workspace")
        return logits
