"""The batch-1 CPU decode step driven from C (``csrc/decode_llama.c``): one call per token runs every
block — norms, q/k/v, RoPE, the KV-cache write, attention, o_proj, gate/up, SiLU·mul, down — and the
output projection, with no torch op in between (issue #17: at a few ms per token, ~450 eager ops cost
more than the matrix products).

The products are the project's own kernels (``cpu_gemv`` fp32, ``cpu_gemv16`` bf16/fp16,
``cpu_qgemv`` W4/W8 blocks) called from C by address, on the model's own weight buffers (nothing is
copied but the small norm vectors and biases, made fp32); the cache is the caller's
:class:`~efficientml.llm.kv_cache.StaticKVCache`, written in place in its dtype, or an int8/int4
``QuantizedKVCache`` (``apply(model, KVCacheQuantConfig(bits=...))``), into which each new key and value
is quantized in C with the same codes, scales and zeros as the Python quantizer and whose codes attention
reads directly (no float copy); either way a later eager or prefill call continues from it. Activations
between the products are fp32 whatever the weights' dtype.

:func:`native_step` gives the step for a (model, cache) or None; :func:`why_not` says in one line why a
model or cache cannot take it (any linear that is not one of those kernels' modules, hooks, ALiBi,
dynamic RoPE past the trained context, another cache type, a padded cache, batch > 1, …). ``generate``
uses it on CPU by default (with ``KVCacheQuantConfig`` too: the model's quantized cache);
``EFFICIENTML_NATIVE_DECODE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import torch
from torch import nn

from efficientml.llm.kernels import cpu_gemv, cpu_gemv16, cpu_qgemv
from efficientml.llm.kernels.gemv_linear import GemvLinear
from efficientml.llm.kernels.kv_layout import KV_CODES, is_quantized_cache, quantized_cache_why
from efficientml.llm.kernels.qgemv_linear import QGemvLinear

SOURCE = Path(__file__).with_name("csrc") / "decode_llama.c"
LIN_NONE, LIN_F32, LIN_BF16, LIN_F16, LIN_Q = -1, 0, 1, 2, 3
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ACTS = {"silu": 0, "gelu": 1, "gelu_pytorch_tanh": 2}

_lock = threading.Lock()
_state: dict[str, object] = {}


class _Linear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("bits", ctypes.c_int32), ("out", ctypes.c_int64),
                ("inp", ctypes.c_int64), ("w", ctypes.c_void_p), ("d", ctypes.c_void_p),
                ("m", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("q_norm", ctypes.c_void_p),
                ("k_norm", ctypes.c_void_p), ("qkv", _Linear * 3), ("o", _Linear), ("gu", _Linear * 2),
                ("down", _Linear)]


class _Model(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in ("n_layers", "d", "n_heads", "n_kv", "hd", "ffn", "rope_dim", "act",
                                               "cache_dtype", "embed_dtype", "isa")] + \
        [(n, ctypes.c_int64) for n in ("vocab", "max_len", "window")] + \
        [(n, ctypes.c_float) for n in ("eps", "attn_scale", "resid_mult", "emb_mult", "logit_scale")] + \
        [("embed", ctypes.c_void_p), ("final_norm", ctypes.c_void_p), ("cos", ctypes.c_void_p),
         ("sin", ctypes.c_void_p), ("kcache", ctypes.c_void_p), ("vcache", ctypes.c_void_p),
         ("layers", ctypes.POINTER(_Layer)), ("head", _Linear), ("fns", ctypes.c_void_p * 3),
         ("work", ctypes.c_void_p), ("kv_g", ctypes.c_int64)] + \
        [(n, ctypes.c_void_p) for n in ("kscale", "vscale", "kzero", "vzero")]


def _fn_address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


def _load():
    """(step function, work-size function, kernel addresses) or None; ``_state["status"]`` says why."""
    if "lib" in _state:
        return _state["lib"]
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib, status = None, ""
        kernels = (cpu_gemv._load(), cpu_gemv16._load(), cpu_qgemv._load())
        if os.environ.get("EFFICIENTML_NATIVE_DECODE", "1") == "0":
            status = "off (EFFICIENTML_NATIVE_DECODE=0)"
        elif any(k is None for k in kernels):
            status = f"off (a kernel it calls is off: cpu_gemv {cpu_gemv.status()}; cpu_qgemv {cpu_qgemv.status()})"
        else:
            dll, status = cpu_gemv.open_library(SOURCE)
            if dll is not None:
                step = cpu_gemv.bind(dll, "efficientml_decode_step", [ctypes.POINTER(_Model), ctypes.c_int64,
                                                                      ctypes.c_int64, ctypes.c_void_p, ctypes.c_int])
                work = cpu_gemv.bind(dll, "efficientml_decode_work_floats", [ctypes.POINTER(_Model)], ctypes.c_int64)
                _state["kv_quantize"] = cpu_gemv.bind(
                    dll, "efficientml_kv_quantize", [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                                                     ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p],
                    None)
                lib = (step, work, tuple(_fn_address(k) for k in kernels))
                status = f"on ({status})"
        _state.update(lib=lib, status=status)
        return lib


def status() -> str:
    _load()
    return str(_state["status"])


def reset() -> None:
    with _lock:
        _state.clear()


def _hooked(mod: nn.Module) -> bool:
    return bool(mod._forward_hooks or mod._forward_pre_hooks)


def _f32(t: torch.Tensor | None, keep: list) -> int | None:
    """Address of ``t`` as a contiguous fp32 CPU tensor (a copy kept alive in ``keep`` when needed)."""
    if t is None:
        return None
    c = t.detach().float().contiguous()
    keep.append(c)
    return c.data_ptr()


def _describe(name: str, mod: nn.Module, keep: list) -> tuple[_Linear, str | None]:
    """One linear as the C side's descriptor, or why it cannot be."""
    lin = _Linear()
    if _hooked(mod):
        return lin, f"{name} has forward hooks"
    if type(mod) is QGemvLinear:
        lin.kind, lin.bits, lin.out, lin.inp = LIN_Q, mod.bits, mod.out_features, mod.in_features
        lin.w, lin.d = mod.qs.data_ptr(), mod.d.data_ptr()
        lin.m = None if mod.m is None else mod.m.data_ptr()
        lin.bias = _f32(mod.bias, keep)
        return lin, None
    if type(mod) not in (nn.Linear, GemvLinear):
        return lin, f"{name} is a {type(mod).__name__} (the native step runs fp32/bf16/fp16 linears and cpu_qgemv's)"
    w = mod.weight
    if w.device.type != "cpu" or w.dtype not in DTYPES or not w.is_contiguous():
        return lin, f"{name}'s weight is {w.dtype} {w.device.type}, {'' if w.is_contiguous() else 'not '}contiguous"
    if w.dtype == torch.float16 and not cpu_gemv16._state.get("f16"):
        return lin, f"{name} is fp16 and the compiler has no _Float16"
    lin.kind = {torch.float32: LIN_F32, torch.bfloat16: LIN_BF16, torch.float16: LIN_F16}[w.dtype]
    lin.out, lin.inp, lin.w = w.shape[0], w.shape[1], w.data_ptr()
    lin.bias = _f32(mod.bias, keep)
    return lin, None


def _consecutive(mods: tuple[nn.Module, ...]) -> bool:
    """Whether the modules' buffers are row blocks of one buffer each (a packed q|k|v or gate|up)."""
    def bufs(m):
        return (m.qs, m.d, m.m) if type(m) is QGemvLinear else (m.weight,)

    if len({type(m) for m in mods}) != 1 or any(m.bias is not None for m in mods):
        return False
    if type(mods[0]) is QGemvLinear and len({(m.bits, m.m is None) for m in mods}) != 1:
        return False
    if type(mods[0]) is not QGemvLinear and len({m.weight.dtype for m in mods}) != 1:
        return False
    for a, b in zip(mods, mods[1:]):
        for ta, tb in zip(bufs(a), bufs(b)):
            if ta is not None and ta.data_ptr() + ta.numel() * ta.element_size() != tb.data_ptr():
                return False
    return True


def _group(names: list[str], mods: tuple[nn.Module, ...], arr, keep: list) -> str | None:
    for i, (n, mod) in enumerate(zip(names, mods)):
        arr[i], why = _describe(n, mod, keep)
        if why:
            return why
    if _consecutive(mods):
        arr[0].out = sum(arr[i].out for i in range(len(mods)))
        for i in range(1, len(mods)):
            arr[i].kind = LIN_NONE
    return None


def _config_why(model: nn.Module) -> str | None:
    from efficientml.llm.model import MLP, Attention, DecoderLayer, LlamaForCausalLM, RMSNorm

    if type(model) is not LlamaForCausalLM:
        return f"the model is a {type(model).__name__}, not the project's LlamaForCausalLM"
    cfg = model.config
    if cfg.position_embedding != "rope":
        return f"{cfg.position_embedding} positions (the native step does RoPE)"
    if cfg.hidden_act not in ACTS:
        return f"activation {cfg.hidden_act}"
    for i, layer in enumerate(model.model.layers):
        if (type(layer), type(layer.self_attn), type(layer.mlp)) != (DecoderLayer, Attention, MLP):
            return f"block {i} is not the plain decoder block (replaced modules)"
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    if any(type(n) is not RMSNorm or n.eps != cfg.rms_norm_eps for n in norms):
        return "a norm differs from RMSNorm(eps=rms_norm_eps)"
    if any(_hooked(m) for m in model.modules() if not isinstance(m, (nn.Linear, GemvLinear, QGemvLinear))):
        return "a module has forward hooks"
    return None


def _linears(model: nn.Module):
    for i, blk in enumerate(model.model.layers):
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"model.layers.{i}.self_attn.{n}", getattr(blk.self_attn, n)
        for n in ("gate_proj", "up_proj", "down_proj"):
            yield f"model.layers.{i}.mlp.{n}", getattr(blk.mlp, n)
    yield "lm_head", model.lm_head


def model_why_not(model: nn.Module) -> str | None:
    """None when every part of ``model`` runs in the native step (whatever the cache), else one line why."""
    if _load() is None:
        return f"the native decode step is {status()}"
    why = _config_why(model)
    if why:
        return why
    for name, mod in _linears(model):
        why = _describe(name, mod, [])[1]
        if why:
            return why
    return None


def kv_quantize(x: torch.Tensor, bits: int, group_size: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The C side's quantizer on rows ``x`` (n, hd) fp32: codes (int8 (n, hd) or packed uint8 (n, hd/2)),
    fp16 scales (n, hd/g) and, int4, fp16 zeros: what the native step writes into a quantized cache."""
    if _load() is None:
        raise RuntimeError(f"the native decode step is {status()}")
    if x.dim() != 2 or bits not in KV_CODES:
        raise ValueError(f"kv_quantize takes rows (n, head_dim) and bits 8 or 4, got shape {tuple(x.shape)}, "
                         f"bits {bits!r}")
    n, hd = x.shape
    if not isinstance(group_size, int) or group_size <= 0 or hd % group_size or (bits == 4 and group_size % 2):
        raise ValueError(f"group_size {group_size!r} must divide head_dim {hd} (and be even for int4)")
    x = x.detach().float().cpu().contiguous()
    codes = torch.empty(n, hd if bits == 8 else hd // 2, dtype=torch.int8 if bits == 8 else torch.uint8)
    scales = torch.empty(n, hd // group_size, dtype=torch.float16)
    zeros = torch.empty_like(scales) if bits == 4 else None
    _state["kv_quantize"](x.data_ptr(), n, hd, bits, group_size, codes.data_ptr(), scales.data_ptr(),
                          None if zeros is None else zeros.data_ptr())
    return codes, scales, zeros


def why_not(model: nn.Module, cache, batch: int) -> str | None:
    """None when the native step can run this model on this cache at this batch, else one line why."""
    from efficientml.llm.kv_cache import StaticKVCache

    if _load() is None:
        return f"the native decode step is {status()}"
    if batch != 1:
        return f"batch {batch} (the native step decodes one sequence)"
    why = _config_why(model)
    if why:
        return why
    if is_quantized_cache(cache):
        why = quantized_cache_why(model, cache)
        if why:
            return why
    elif type(cache) is not StaticKVCache or cache.k.device.type != "cpu" or cache.k.dtype not in DTYPES:
        return f"the cache is a {type(cache).__name__} (the native step writes a plain fp32/bf16/fp16 " \
               "StaticKVCache or an int8/int4 quantized one)"
    if cache.key_mask is not None:
        return "the cache has padding slots"
    dtypes = [model.model.embed_tokens.weight.dtype] + ([cache.k.dtype] if hasattr(cache, "k") else [])
    if torch.float16 in dtypes and not cpu_gemv16._state.get("f16"):
        return "an fp16 cache or embedding, and the compiler has no _Float16"
    rope = model.model.rope
    if rope.dynamic and cache.max_length > rope.initial:
        return "dynamic RoPE scaling past the trained context"
    return None


def _layer(L: _Layer, i: int, blk: nn.Module, keep: list) -> None:
    a, mlp = blk.self_attn, blk.mlp
    L.attn_norm, L.mlp_norm = _f32(blk.input_layernorm.weight, keep), \
        _f32(blk.post_attention_layernorm.weight, keep)
    L.q_norm = None if a.q_norm is None else _f32(a.q_norm.weight, keep)
    L.k_norm = None if a.k_norm is None else _f32(a.k_norm.weight, keep)
    p = f"model.layers.{i}."
    why = _group([p + "self_attn." + n for n in ("q_proj", "k_proj", "v_proj")],
                 (a.q_proj, a.k_proj, a.v_proj), L.qkv, keep) \
        or _group([p + "mlp.gate_proj", p + "mlp.up_proj"], (mlp.gate_proj, mlp.up_proj), L.gu, keep)
    L.o, w1 = _describe(p + "self_attn.o_proj", a.o_proj, keep)
    L.down, w2 = _describe(p + "mlp.down_proj", mlp.down_proj, keep)
    if why or w1 or w2:
        raise ValueError(why or w1 or w2)


def model_struct(model: nn.Module, max_len: int, rope_len: int, fns, keep: list) -> _Model:
    """The C side's model descriptor without its cache buffers: ``max_len`` positions (or pool slots) per
    kv head and layer, RoPE tables for ``rope_len`` positions; ``keep`` holds the fp32 copies alive."""
    cfg, mm = model.config, model.model
    m = _Model()
    m.n_layers, m.d, m.n_heads, m.n_kv = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, \
        cfg.num_key_value_heads
    m.hd, m.ffn, m.vocab, m.max_len = cfg.dim_per_head, cfg.intermediate_size, cfg.vocab_size, max_len
    m.act, m.embed_dtype = ACTS[cfg.hidden_act], DTYPES[mm.embed_tokens.weight.dtype]
    m.isa, m.window = int(cpu_qgemv._state["isa"]), cfg.sliding_window or 0
    m.eps, m.resid_mult, m.emb_mult = cfg.rms_norm_eps, cfg.residual_multiplier, cfg.embedding_multiplier
    m.attn_scale = cfg.attention_multiplier or cfg.dim_per_head ** -0.5
    m.logit_scale = cfg.logits_scaling
    emb = mm.embed_tokens.weight.detach()
    keep.append(emb.contiguous())
    m.embed, m.final_norm = keep[-1].data_ptr(), _f32(mm.norm.weight, keep)
    cos, sin = mm.rope.tables(rope_len, torch.device("cpu"), torch.float32)  # RoPE only (why_not)
    cos, sin = cos[:rope_len].contiguous(), sin[:rope_len].contiguous()
    keep += [cos, sin]
    m.cos, m.sin, m.rope_dim = cos.data_ptr(), sin.data_ptr(), cos.shape[1]
    layers = (_Layer * cfg.num_hidden_layers)()
    for i, blk in enumerate(mm.layers):
        _layer(layers[i], i, blk, keep)
    keep.append(layers)
    m.layers = ctypes.cast(layers, ctypes.POINTER(_Layer))
    m.head, why = _describe("lm_head", model.lm_head, keep)
    if why:
        raise ValueError(why)
    m.fns[:] = fns
    return m


class NativeStep:
    """``step(ids (1, 1), pos) → logits (1, vocab)`` for one (model, cache) pair."""

    def __init__(self, model: nn.Module, cache) -> None:
        step, work_floats, fns = _load()
        self.fn, self.model, self.cache, self.batch, self.key_mask = step, model, cache, 1, None
        self.keep: list = []
        self.m = self._model_struct(model, cache, fns)
        self.work = torch.empty(work_floats(ctypes.byref(self.m)), dtype=torch.float32)
        self.m.work = self.work.data_ptr()

    def _model_struct(self, model: nn.Module, cache, fns) -> _Model:
        m = model_struct(model, cache.max_length, cache.max_length, fns, self.keep)
        self._cache_buffers(m, cache)
        return m

    @staticmethod
    def _cache_buffers(m: _Model, cache) -> None:
        if not is_quantized_cache(cache):
            m.cache_dtype, m.kv_g = DTYPES[cache.k.dtype], 1
            m.kcache, m.vcache = cache.k.data_ptr(), cache.v.data_ptr()
            return
        m.cache_dtype, m.kv_g = KV_CODES[cache.bits], cache.g
        m.kcache, m.vcache = (t.data_ptr() for t in cache.codes)
        m.kscale, m.vscale = (t.data_ptr() for t in cache.scales)
        if cache.bits == 4:
            m.kzero, m.vzero = (t.data_ptr() for t in cache.zeros)

    def __call__(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        logits = torch.empty(1, self.m.vocab, dtype=torch.float32)
        rc = self.fn(ctypes.byref(self.m), int(ids.reshape(-1)[0]), pos, logits.data_ptr(), torch.get_num_threads())
        if rc == -2:
            raise IndexError(f"token {int(ids.reshape(-1)[0])} or position {pos} outside the model/cache")
        if rc != 0:
            raise MemoryError("the native decode step could not allocate a kernel workspace")
        return logits


def native_step(model: nn.Module, cache, batch: int) -> NativeStep | None:
    """The native step for this (model, cache), made once per cache and reused (None: see :func:`why_not`)."""
    if why_not(model, cache, batch) is not None:
        return None
    step = getattr(cache, "_native_step", None)
    if step is None or step.model is not model:
        try:
            step = NativeStep(model, cache)
        except ValueError:
            return None
        cache._native_step = step
    return step
