"""One instrumented forward pass that every cost analysis reads: the executed ops in order.

The model runs once under a :class:`~torch.overrides.TorchFunctionMode` that sees every torch function
call (``F.conv2d``, ``torch.matmul``, ``x + y``, ``F.scaled_dot_product_attention`` …) and forward
hooks on every module that keep a stack of the modules being executed. A **step** is either

- one call of a *leaf* module (a module without children: ``Conv2d``, ``ReLU``, a ``LambdaLayer``):
  its inputs and outputs are what the hooks see, and the costs of all torch calls inside it are
  summed into it; or
- one torch function call made outside any leaf module (``out += identity`` in a residual block,
  ``q @ k.transpose(-2, -1)`` in an attention module, ``torch.flatten``) that returns tensors.

Each step records its cost (:class:`~efficientml.analysis.costs.OpCost`), the tensors it read and wrote
(Python id, storage address and storage size, so views and in-place results are recognized as the same
memory), and for convolutions and pools the window geometry. Parameters and buffers are not
activations and are left out of the tensor lists; so is anything computed from them and constants
alone (``weight_orig * mask`` in a pruning pre-hook, a causal mask from ``torch.ones``), which is
neither counted as work nor as activation memory. All tensors are kept alive until the pass ends, so
ids and storage addresses are unique within one trace.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from efficientml.analysis.costs import (CONVS, METADATA, POOLS, ZERO, OpCost, _arg, _ntuple, op_cost,
                                       op_name, pool_kernel)
from efficientml.analysis.inputs import expected_input, make_inputs, model_device  # noqa: F401
from efficientml.core.errors import ShapeError


@dataclass(frozen=True)
class TensorRef:
    """An activation seen by the trace: identity, backing storage and shape."""

    id: int                  # id() of the tensor object (unique within one trace)
    storage: int             # data_ptr of its storage: views and in-place results share it
    storage_elements: int    # elements the storage holds (≥ numel for views)
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class WindowGeometry:
    """A sliding window (conv or pool) as executed: sizes are spatial only."""

    op: str                            # "conv2d", "max_pool2d", "adaptive_avg_pool2d", …
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    in_size: tuple[int, ...]
    out_size: tuple[int, ...]


@dataclass
class Step:
    index: int
    name: str                # "layer1.0.conv1", "layer1.0.add", "features.3(2)" for a 2nd call
    kind: str                # module class ("Conv2d") or function name ("add")
    module: str              # dotted path of the module that ran it ("" = the model)
    is_module: bool
    cost: OpCost = ZERO
    params: int = 0          # parameters of the leaf module (on its first call only)
    inputs: list[TensorRef] = field(default_factory=list)
    outputs: list[TensorRef] = field(default_factory=list)
    windows: list[WindowGeometry] = field(default_factory=list)

    @property
    def output_shape(self) -> tuple[int, ...] | None:
        return self.outputs[0].shape if self.outputs else None


@dataclass
class Trace:
    steps: list[Step]
    inputs: list[TensorRef]     # the model's input tensors
    outputs: list[TensorRef]    # the model's output tensors

    @property
    def total(self) -> OpCost:
        tot = ZERO
        for s in self.steps:
            tot = tot + s.cost
        return tot


# --- inputs ------------------------------------------------------------------------------------


def _describe(args: tuple, kwargs: dict) -> str:
    shapes = [tuple(t.shape) for t in _tensors((args, kwargs))]
    if len(shapes) == 1:
        return f"input of shape {shapes[0]}"
    return f"inputs of shapes {shapes}"


# --- the tracer --------------------------------------------------------------------------------


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def _window(name: str, args: tuple, kwargs: dict, out: Any) -> WindowGeometry | None:
    y = out[0] if isinstance(out, (tuple, list)) else out
    x = _arg(args, kwargs, 0, "input")
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        return None
    if name in CONVS:
        w = _arg(args, kwargs, 1, "weight")
        nd = w.dim() - 2
        pad = _arg(args, kwargs, 4, "padding", 0)
        return WindowGeometry(
            name, tuple(int(k) for k in w.shape[2:]), _ntuple(_arg(args, kwargs, 3, "stride", 1), nd),
            pad if isinstance(pad, str) else _ntuple(pad, nd),
            _ntuple(_arg(args, kwargs, 5, "dilation", 1), nd),
            tuple(x.shape[-nd:]), tuple(y.shape[-nd:]))
    if name in POOLS:
        nd = int(name.split("pool")[1][0])
        in_size, out_size = tuple(x.shape[-nd:]), tuple(y.shape[-nd:])
        if name.startswith("adaptive"):  # window ⌈in/out⌉, step ⌊in/out⌋ (exact when divisible)
            k = tuple(math.ceil(i / o) for i, o in zip(in_size, out_size))
            s = tuple(max(1, i // o) for i, o in zip(in_size, out_size))
            return WindowGeometry(name, k, s, (0,) * nd, (1,) * nd, in_size, out_size)
        k = pool_kernel(name, args, kwargs)
        assert k is not None
        stride = _arg(args, kwargs, 2, "stride", None)
        s = k if stride is None or stride == [] or stride == () else _ntuple(stride, nd)
        pad = _ntuple(_arg(args, kwargs, 3, "padding", 0), nd)
        dil = _ntuple(_arg(args, kwargs, 4, "dilation", 1), nd) if name.startswith("max") \
            else (1,) * nd
        return WindowGeometry(name, k, s, pad, dil, in_size, out_size)
    return None


class _Tracer(TorchFunctionMode):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.names = {m: n for n, m in model.named_modules()}
        self.leaves = {m for m in self.names if not any(True for _ in m.children())}
        weights = list(model.parameters()) + list(model.buffers())
        self.skip = {p for p in map(_ptr, weights) if p}   # weight storages (not activations)
        self.weight_ids = {id(t) for t in weights}          # for tensors without storage (meta)
        self.steps: list[Step] = []
        self.keep: list[torch.Tensor] = []     # keeps ids and storage addresses unique
        self.stack: list[nn.Module] = []
        self.leaf: Step | None = None           # the leaf module step being executed
        self.quiet = False                      # our own bookkeeping calls are not the model's
        self.calls: dict[str, int] = {}
        self.seen_params: set[nn.Module] = set()   # leaf modules whose parameters are counted
        self.counted: set[int] = set()              # ids of parameters attributed to a step

    # tensors → refs (called with quiet=True)
    def refs(self, obj: Any) -> list[TensorRef]:
        out = []
        for t in _tensors(obj):
            try:
                st = t.untyped_storage()
                ptr, nbytes = st.data_ptr(), st.nbytes()
            except (RuntimeError, NotImplementedError):  # tensors without storage
                continue
            if self.is_weight(t):
                continue
            self.keep.append(t)
            elements = nbytes // max(1, t.element_size())
            if ptr == 0:  # meta or empty: no address to share, so every tensor is its own buffer
                ptr, elements = -id(t), t.numel()
            out.append(TensorRef(id(t), ptr, elements, tuple(t.shape),
                                 str(t.dtype).replace("torch.", "")))
        return out

    def is_weight(self, t: torch.Tensor) -> bool:
        if id(t) in self.weight_ids:
            return True
        p = _ptr(t)
        return bool(p) and p in self.skip

    def unique(self, name: str) -> str:
        n = self.calls.get(name, 0) + 1
        self.calls[name] = n
        return name if n == 1 else f"{name}({n})"

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.stack.append(module)
        if module in self.leaves and self.leaf is None:
            self.quiet = True
            try:
                path = self.names[module]
                params = 0
                if module not in self.seen_params:
                    self.seen_params.add(module)
                    params = sum(p.numel() for p in module.parameters()
                                 if id(p) not in self.counted)
                    self.counted.update(id(p) for p in module.parameters())
                self.leaf = Step(len(self.steps), self.unique(path or type(module).__name__),
                                 type(module).__name__, path, True, params=params,
                                 inputs=self.refs((args, kwargs)))
            finally:
                self.quiet = False

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()
        if self.leaf is not None and self.leaf.module == self.names[module] and \
                module in self.leaves:
            self.quiet = True
            try:
                self.leaf.outputs = self.refs(out)
            finally:
                self.quiet = False
            self.steps.append(self.leaf)
            self.leaf = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.quiet:
            return out
        name = op_name(func)
        if name in METADATA:
            return out
        if all(self.is_weight(t) for t in _tensors((args, kwargs))):
            # computed from weights and constants only (a pruning mask applied in a pre-hook,
            # a causal mask built by torch.ones): a derived weight, not activation work
            for t in _tensors(out):
                self.keep.append(t)  # pins the id
                self.weight_ids.add(id(t))
                if _ptr(t):
                    self.skip.add(_ptr(t))
            return out
        cost = op_cost(name, getattr(func, "__name__", ""), args, kwargs, out)
        window = _window(name, args, kwargs, out) if (name in CONVS or name in POOLS) else None
        if self.leaf is not None:
            self.leaf.cost = self.leaf.cost + cost
            if window is not None:
                self.leaf.windows.append(window)
            return out
        if not any(True for _ in _tensors(out)):
            return out
        owner = self.names.get(self.stack[-1], "") if self.stack else ""
        step = Step(len(self.steps), self.unique(f"{owner}.{name}" if owner else name), name, owner,
                    False, cost=cost, inputs=self.refs((args, kwargs)), outputs=self.refs(out),
                    windows=[window] if window is not None else [])
        self.steps.append(step)
        return out


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the block and restore each one's own flag after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, t in modes.items():
            m.training = t


@contextlib.contextmanager
def _eval_no_fastpath(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the pass; MHA's fused fast path off so its matmuls are visible."""
    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None else None
    with eval_mode(model), torch.no_grad():
        try:
            if mha is not None:
                mha.set_fastpath_enabled(False)
            yield
        finally:
            if mha is not None and fast is not None:
                mha.set_fastpath_enabled(fast)


def trace_model(model: nn.Module, input_shape: Any = None, *, inputs: Any = None) -> Trace:
    """Run ``model`` once (eval mode, no grad) and return its executed steps in order.

    A forward pass that fails with a RuntimeError (almost always a shape mismatch) is re-raised as
    :class:`ShapeError` naming the input given and, where it can be inferred, the one expected.
    """
    args, kwargs = make_inputs(model, input_shape, inputs)
    tracer = _Tracer(model)
    handles = []
    for m in tracer.names:
        # prepend: a leaf's own pre-hooks (pruning masks, fake quant) run inside its step
        handles.append(m.register_forward_pre_hook(tracer.pre_hook, with_kwargs=True,
                                                   prepend=True))
        handles.append(m.register_forward_hook(tracer.hook, with_kwargs=True))
    try:
        with _eval_no_fastpath(model):
            tracer.quiet = True
            in_refs = tracer.refs((args, kwargs))
            tracer.quiet = False
            with tracer:
                try:
                    out = model(*args, **kwargs)
                except torch.OutOfMemoryError:
                    raise
                except RuntimeError as e:
                    raise shape_error(model, args, kwargs, e) from e
            out_refs = tracer.refs(out)
    finally:
        for h in handles:
            h.remove()
    _attribute_functional_params(model, tracer)
    return Trace(tracer.steps, in_refs, out_refs)


def _attribute_functional_params(model: nn.Module, tracer: _Tracer) -> None:
    """Parameters no leaf call owns (``nn.MultiheadAttention.in_proj_weight``, a raw
    ``nn.Parameter`` used in a functional matmul) go to the first functional step of the module
    holding them that does work, so the per-step parameters add up to the model's total."""
    for pname, p in model.named_parameters():
        if id(p) in tracer.counted:
            continue
        owner = pname.rpartition(".")[0]
        fits = [s for s in tracer.steps if not s.is_module and s.cost and (
            s.module == "" or owner == s.module or owner.startswith(s.module + "."))]
        if fits:  # the innermost module holding the parameter, its first step doing work
            best = max(fits, key=lambda s: (len(s.module), -s.index))
            best.params += p.numel()
            tracer.counted.add(id(p))


def shape_error(model: nn.Module, args: tuple, kwargs: dict, err: Exception) -> ShapeError:
    given = _describe(args, kwargs)
    expected = expected_input(model)
    why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if expected:
        return ShapeError(f"the model cannot run on {given}: it expects {expected} ({why})")
    return ShapeError(f"the model cannot run on {given} ({why})")
