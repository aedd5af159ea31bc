"""One way to apply a technique: ``apply(model, config, *, calib=None, filter=None, inplace=False)``.

The config's type selects the handler (a registry, as torchao's ``quantize_(model, config)``). Every
technique, CNN or LLM, is a :class:`~efficientml.core.config.Config` plus one handler registered with
``@register_transform(ConfigCls)`` in the module that defines the config, so importing a config's
module is enough for ``apply`` to find it.

Copy or in place (the same rule for every technique):

- ``inplace=False`` (default): ``apply`` never modifies the model you pass; it works on a deep copy.
- ``inplace=True``: techniques that edit weights or swap submodules do it on your model (no copy, the
  right choice for a large LLM); techniques that build a different kind of model (``IntegerConfig``,
  ``QATConfig``, ``BinaryConfig``) still leave your model as it was.
- Either way, ``result.model`` is the transformed model: always use it.

``calib`` is the one name for calibration data (a loader or list of CNN batches; a ``(N, T)`` token
tensor for LLMs). ``filter`` selects the layers a technique touches (:class:`LayerFilter`, or a spec
that :func:`as_filter` turns into one); each handler has a default selection (CNNs: every Conv/Linear
it supports; LLMs: every decoder-block linear). ``options`` are the handler's own run-time knobs
(for the LLM ones: ``batch_size``, ``device``, ``progress``, ``pack``, ``search_cache``, ``stats``,
``keep_stats``); an option a handler does not take is a ConfigError naming the ones it does.

Techniques and their paths ("real": integer kernels, packed weights, smaller layers or a packed
file; "simulated": float weights holding the rounded values, masks, or fake-quant modules):

==========================  ====================================================  ===================
config                      technique                                             path
==========================  ====================================================  ===================
quant.IntegerConfig         integer-only int8 (BN folded, calibrated activations)  real
quant.WeightOnlyConfig      weights rounded to a registered number format         simulated
quant.KMeansConfig          per-layer k-means codebooks (fine-tunable)            simulated
quant.AdaRoundConfig        learned rounding, layer-wise reconstruction           simulated
quant.QATConfig             fake-quant modules for training (STE, LSQ, BN fold)   simulated
quant.BinaryConfig          BWN / XNOR / TWN / TTQ                                simulated
quant.DeepCompressionConfig prune + k-means (then fine-tune, save_compressed)     simulated (real file)
prune.PruneConfig           method="channel": smaller layers; other methods: masks real / simulated
llm.compress.RTNConfig      round-to-nearest weight-only                          real (pack=False: sim.)
llm.compress.AWQConfig      activation-aware scales (+ clip, + GPTQ)              real (pack=False: sim.)
llm.compress.GPTQConfig     Hessian-based error compensation                      real (pack=False: sim.)
llm.compress.SmoothQuantConfig  W8A8 with migrated activation outliers            real (pack=False: sim.)
llm.compress.LLMPruneConfig magnitude / Wanda / SparseGPT (zeros in dense weights) simulated
llm.compress.KVCacheQuantConfig int8/int4 KV cache from ``model.new_cache()``     real
finetune.LoRAConfig         LoRA / DoRA adapters (QLoRAConfig: on an NF4 base)     real
finetune.BitFitConfig       biases only (optionally zero biases added)            real
finetune.AdapterConfig      Houlsby / Pfeiffer bottleneck adapters                real
finetune.IA3Config           IA3 scaling vectors (mergeable)                       real
finetune.PromptTuningConfig soft prompt through the KV cache                      real
finetune.PrefixTuningConfig per-layer K/V prefixes (optional MLP)                 real
finetune.TinyTLConfig       frozen CNN, biases + lite residuals, lean backward    real
==========================  ====================================================  ===================
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch.nn as nn

from efficientml.core.config import Config
from efficientml.core.errors import ConfigError
from efficientml.core.modules import get_module

PATHS = ("real", "simulated")
_FIXED = {"model", "config", "calib", "filter"}         # every handler's own parameters
_HANDLERS: dict[type, Callable[..., "TransformResult"]] = {}


def register_transform(config_cls: type) -> Callable:
    """Decorator: ``@register_transform(MyConfig)`` over ``fn(model, config, *, calib, filter, **knobs)``.

    The handler gets the model to transform (already copied unless ``inplace``), the config, the
    calibration data (or None), a :class:`LayerFilter`, and its own keyword-only knobs."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, Config)):
        raise ConfigError(f"register_transform takes a Config subclass, got {config_cls!r}")

    def add(fn: Callable) -> Callable:
        if config_cls in _HANDLERS:
            raise ConfigError(f"a transform for {config_cls.__name__} is already registered")
        _HANDLERS[config_cls] = fn
        return fn

    return add


def registered() -> list[str]:
    """Names of the config types with a registered handler (those whose modules are imported)."""
    return sorted(c.__name__ for c in _HANDLERS)


def handler_for(config: Config) -> Callable[..., "TransformResult"]:
    for cls in type(config).__mro__:                      # a subclass inherits its base's handler
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    raise ConfigError(f"no transform is registered for {type(config).__name__}; expected a config of "
                      f"one of the registered types: {', '.join(registered()) or 'none'} (a config's "
                      "handler is registered when its module is imported)")


def options_of(fn: Callable) -> list[str]:
    """The run-time knobs a handler takes (its keyword-only parameters)."""
    return sorted(n for n, p in inspect.signature(fn).parameters.items()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in _FIXED)


def apply(model: nn.Module, config: Config, *, calib: Any = None, filter: Any = None,
          inplace: bool = False, **options: Any) -> "TransformResult":
    """Apply the technique selected by ``config``'s type and return a :class:`TransformResult`.

    ``inplace=False`` (default) works on a deep copy, so ``model`` is left as it was; with
    ``inplace=True`` weight edits and module swaps happen on ``model`` itself (techniques that build
    another kind of model still return a new one). Use ``result.model`` in both cases.
    ``calib``: calibration data; ``filter``: which layers (see :class:`LayerFilter`); ``options``: the
    handler's documented knobs."""
    if not isinstance(config, Config):
        raise ConfigError(f"apply() takes a Config instance as its second argument, got {type(config).__name__}")
    fn = handler_for(config)
    known = options_of(fn)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"{type(config).__name__} does not take option(s) {unknown}; its options are "
                          f"{known or 'none'}")
    work = model if inplace else copy.deepcopy(model)
    result = fn(work, config, calib=calib, filter=as_filter(filter), **options)
    if result.path not in PATHS:
        raise ConfigError(f"{fn.__name__} returned path {result.path!r}; expected one of {PATHS}")
    return result


@dataclass
class TransformResult:
    """What ``apply`` returns: the transformed model, what changed per layer, the path and the config.

    ``layers``: layer name → what changed there (bits, sparsity, kept channels …); ``report``: the
    technique's free-form figures (seconds, search results …). Subclasses add artifacts that are not
    JSON (a :class:`~efficientml.prune.masks.MaskSet`, a channel plan)."""

    model: nn.Module
    config: Config
    path: str = "simulated"                   # "real" or "simulated", see the module docstring
    layers: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the config as its ``to_dict``; values JSON cannot hold become strings."""
        d = {"config": self.config.to_dict(), "path": self.path, "layers": self.layers, "report": self.report}
        return json.loads(json.dumps(d, default=str))


_GLOB = set("*?[")


def _is_glob(pattern: str) -> bool:
    return bool(_GLOB & set(pattern))


def _type_names(types: Iterable[Any]) -> tuple[str, ...]:
    return tuple(t if isinstance(t, str) else t.__name__ for t in types)


@dataclass(frozen=True)
class LayerFilter:
    """Which layers a technique touches, by dotted name, glob and module type.

    ``include``: names (``backbone.conv3``) or globs (``model.layers.*.mlp.*``); empty means the
    handler's default selection. ``types``: module classes or class names, narrowing the candidates
    (default: the types the handler supports). ``exclude`` / ``exclude_types``: never these. An exact
    name is taken as given (it must exist, else ConfigError); a glob matches candidates of the selected
    types only (a glob in ``include`` that matches none is a ConfigError)."""

    include: tuple[str, ...] = ()            # exact names taken as given; globs match candidates
    exclude: tuple[str, ...] = ()            # names or globs
    types: tuple[Any, ...] = ()
    exclude_types: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        for f in ("include", "exclude", "types", "exclude_types"):
            v = getattr(self, f)
            if isinstance(v, (str, type)):
                v = (v,)
            object.__setattr__(self, f, tuple(v))
        bad = [p for p in self.include + self.exclude if not isinstance(p, str)]
        if bad:
            raise ConfigError(f"layer filter names and globs must be strings, got {bad[0]!r}")

    @property
    def explicit(self) -> bool:
        """True when ``include`` names the layers (the handler's default selection is not used)."""
        return bool(self.include)

    @staticmethod
    def _type_ok(m: nn.Module, types: tuple[Any, ...]) -> bool:
        """An instance of one of ``types`` (classes, or class names matched exactly); () allows any."""
        return not types or any(isinstance(m, t) if isinstance(t, type) else type(m).__name__ == t
                                for t in types)

    def excluded(self, name: str, module: nn.Module | None = None) -> bool:
        if any(fnmatch.fnmatchcase(name, p) if _is_glob(p) else name == p for p in self.exclude):
            return True
        return module is not None and bool(self.exclude_types) and self._type_ok(module, self.exclude_types)

    def check(self, model: nn.Module) -> None:
        """ConfigError for an exact name the model lacks (naming it and the model's layers)."""
        for p in self.include + self.exclude:
            if not _is_glob(p):
                get_module(model, p)

    def select(self, model: nn.Module, default_types: tuple[type, ...],
               default_include: tuple[str, ...] = ()) -> list[str]:
        """Names of the selected layers, in model order (``model.named_modules()``)."""
        self.check(model)
        types = self.types or default_types
        include = self.include or default_include
        exact = {p for p in include if not _is_glob(p)}
        globs = [p for p in include if _is_glob(p)]
        out, hit = [], set()
        for n, m in model.named_modules():
            if include:
                g = [p for p in globs if fnmatch.fnmatchcase(n, p) and self._type_ok(m, types)]
                hit.update(g)
                chosen = n in exact or bool(g)
            else:
                chosen = self._type_ok(m, types)
            if chosen and not self.excluded(n, m):
                out.append(n)
        missing = [p for p in globs if p not in hit]
        if missing and self.include:
            raise ConfigError(f"layer glob {missing[0]!r} matches no {'/'.join(_type_names(types))} layer "
                              "of the model")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"include": list(self.include), "exclude": list(self.exclude),
                "types": list(_type_names(self.types)), "exclude_types": list(_type_names(self.exclude_types))}


def as_filter(spec: Any) -> LayerFilter:
    """Normalize a filter spec: None (default selection), a LayerFilter, a name or glob, a module
    type, a list of names/globs/types, or a dict of LayerFilter's fields."""
    if spec is None:
        return LayerFilter()
    if isinstance(spec, LayerFilter):
        return spec
    if isinstance(spec, dict):
        names = {f.name for f in dataclasses.fields(LayerFilter)}
        unknown = sorted(set(spec) - names)
        if unknown:
            raise ConfigError(f"layer filter got unknown key(s) {unknown}; expected some of {sorted(names)}")
        return LayerFilter(**spec)
    items = [spec] if isinstance(spec, (str, type)) else list(spec)
    names = tuple(s for s in items if isinstance(s, str))
    types = tuple(s for s in items if isinstance(s, type))
    if len(names) + len(types) != len(items):
        raise ConfigError(f"a layer filter is a LayerFilter, names/globs, module types or a dict; got {spec!r}")
    return LayerFilter(include=names, types=types)
