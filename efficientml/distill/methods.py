"""Which knowledge a student learns from its teacher: :class:`DistillConfig` picks it, :class:`Distiller`
computes it.

========  ==========================================  ===========================================
method    feature term (weight ``beta``)              layers (``student_layers``/``teacher_layers``)
========  ==========================================  ===========================================
none      — (plain cross-entropy, nothing else)       —
kd        — (logit KD only)                           —
hint      FitNets hint through a learned 1×1 adapter  feature maps
at        activation attention transfer               feature maps
at_grad   gradient attention transfer (∂CE/∂x maps)   — (the input)
ab        activation boundaries (margin ``margin``)   pre-activations (BatchNorm outputs)
fsp       FSP Grams of consecutive layers             feature maps (at least 2)
rkd       RKD distance + 2 × angle                    feature maps (flattened as embeddings)
sp        similarity-preserving                       feature maps
weights   weight matching (maps of rank ``rank``)     modules with a weight (conv, linear)
========  ==========================================  ===========================================

The loss of a batch is ``(1 − alpha)·CE + alpha·KD + beta·F``: ``alpha`` weighs the soft targets
(``T²·KL`` at ``temperature``) against the labels and ``beta`` adds the method's term F (summed over layer
pairs). ``alpha = 0`` gives ``CE + beta·F``; method ``none`` is exactly the cross-entropy of
:func:`efficientml.train.fit`. With ``only_where_teacher_correct`` the soft targets are used only on samples
where the teacher predicts the true label and gives it more probability than the student does; the
others get plain CE (the feature term is unchanged).

Empty layer lists pick one layer per spatial resolution (:func:`efficientml.distill.hooks.auto_layers`) in
each model and pair the deepest ones when the counts differ; for ``weights`` the first conv and the last
linear of each model (the classifiers share the class count; the first convs their input channels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.config import Config, check_choice, check_range
from efficientml.core.errors import ConfigError
from efficientml.distill import features as feat
from efficientml.distill import relations as rel
from efficientml.distill.hooks import FeatureCapture, auto_layers, find_module, output_shapes
from efficientml.distill.losses import kd_per_sample, kd_loss
from efficientml.distill.weights import WeightMatcher

METHODS = ("none", "kd", "hint", "at", "at_grad", "ab", "fsp", "rkd", "sp", "weights")
FEATURE_METHODS = ("hint", "at", "ab", "fsp", "rkd", "sp")
# beta when none is given: the papers' weights for their normalisations of each term
DEFAULT_BETA = {"none": 0.0, "kd": 0.0, "hint": 1.0, "at": 1000.0, "at_grad": 1000.0, "ab": 1.0, "fsp": 1.0,
                "rkd": 25.0, "sp": 3000.0, "weights": 1.0}


@dataclass(frozen=True)
class DistillConfig(Config):
    kind: ClassVar[str] = "distill"

    method: str = "kd"
    temperature: float = 4.0
    alpha: float = 0.9                      # weight of the soft targets; CE gets 1 − alpha
    beta: float | None = None               # weight of the feature term; None = DEFAULT_BETA[method]
    student_layers: tuple[str, ...] = ()    # dotted module names; empty = automatic
    teacher_layers: tuple[str, ...] = ()
    only_where_teacher_correct: bool = False
    at_p: float = 2.0                       # attention maps: mean over channels of |a|^p
    margin: float = 1.0                     # activation-boundary margin μ
    rank: int | None = None                 # weight maps: full (None) or of this rank

    def validate(self) -> None:
        check_choice("method", self.method, METHODS)
        check_range("temperature", self.temperature, 0.0, 100.0, lo_open=True)
        check_range("alpha", self.alpha, 0.0, 1.0)
        if self.beta is not None and not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta)
                                          and self.beta >= 0):
            raise ConfigError(f"beta must be a non-negative number or None (the method's default), got {self.beta!r}")
        check_range("at_p", self.at_p, 0.0, 16.0, lo_open=True)
        check_range("margin", self.margin, 0.0, 1e6)
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ConfigError(f"rank must be a positive integer or None (full maps), got {self.rank!r}")
        self._validate_layers()
        if self.only_where_teacher_correct and self.method == "none":
            raise ConfigError("only_where_teacher_correct needs a teacher's soft targets; method 'none' has none")

    def _validate_layers(self) -> None:
        for name in ("student_layers", "teacher_layers"):
            v = getattr(self, name)
            if not isinstance(v, tuple) or not all(isinstance(s, str) and s for s in v):
                raise ConfigError(f"{name} must be a tuple of dotted module names, got {v!r}")
        s, t = self.student_layers, self.teacher_layers
        if self.method not in FEATURE_METHODS + ("weights",) and (s or t):
            raise ConfigError(f"method {self.method!r} uses no intermediate layers; leave student_layers and "
                              "teacher_layers empty")
        if bool(s) != bool(t) or len(s) != len(t):
            raise ConfigError(f"student_layers and teacher_layers pair up one to one; got {len(s)} and {len(t)} "
                              "names (give both, of equal length, or neither)")
        if self.method == "fsp" and s and len(s) < 2:
            raise ConfigError("method 'fsp' relates consecutive layers; name at least 2 layers in each model")

    @property
    def feature_weight(self) -> float:
        return DEFAULT_BETA[self.method] if self.beta is None else float(self.beta)


def _freeze(teacher: nn.Module) -> nn.Module:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _device(m: nn.Module) -> torch.device:
    return next((p.device for p in m.parameters()), torch.device("cpu"))


def _pair(s: tuple[str, ...], t: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    k = min(len(s), len(t))                 # the deepest layers carry the most task knowledge
    return s[len(s) - k:], t[len(t) - k:]


def weight_layers(model: nn.Module) -> tuple[str, ...]:
    """The automatic layers of method ``weights``: the first Conv2d (if any) and the last Linear."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear for weight matching; name the layers")
    return tuple(convs[:1] + linears[-1:])


class Distiller(nn.Module):
    """The distillation loss of ``config`` between ``student`` and a frozen ``teacher``.

    It keeps hooks on both models (the student's batch through a forward pre-hook, the chosen layers'
    outputs) and the learned adapters: ``parameters()`` are exactly those adapters (1×1 convs, weight
    maps), to be optimized together with the student. The teacher is not a submodule and stays in eval
    mode. ``example_input`` (a batch of one or more inputs) sizes the adapters and the automatic layers;
    it is needed by every method but ``none``, ``kd`` and ``at_grad``.

        with Distiller(student, teacher, DistillConfig(method="hint"), x[:2]) as d:
            logits = student(x)
            loss, parts = d.loss(x, y, logits)
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, config: DistillConfig,
                 example_input: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.config, self.label_smoothing = config, label_smoothing
        self._models = (student, _freeze(teacher))  # a tuple: not registered, so not in parameters()
        self.adapters = nn.ModuleDict()
        self.weight_maps = nn.ModuleList()
        self._caps: tuple[FeatureCapture, FeatureCapture] | None = None
        self.student_layers: tuple[str, ...] = ()
        self.teacher_layers: tuple[str, ...] = ()
        if config.method in FEATURE_METHODS:
            self._setup_features(example_input)
        elif config.method == "weights":
            self._setup_weights()
        self.to(_device(student))
        self._x: torch.Tensor | None = None
        self._hook = student.register_forward_pre_hook(self._keep_input)

    @property
    def student(self) -> nn.Module:
        return self._models[0]

    @property
    def teacher(self) -> nn.Module:
        return self._models[1]

    def _setup_features(self, example_input: torch.Tensor | None) -> None:
        cfg = self.config
        if example_input is None:
            raise ConfigError(f"method {cfg.method!r} needs example_input (a batch the models accept) to pick "
                              "layers and size the adapters")
        s_names, t_names = cfg.student_layers, cfg.teacher_layers
        if not s_names:
            pre = cfg.method == "ab"
            s_names, t_names = _pair(auto_layers(self.student, example_input, pre),
                                     auto_layers(self.teacher, example_input, pre))
        for n in s_names:
            find_module(self.student, n)
        for n in t_names:
            find_module(self.teacher, n)
        self.student_layers, self.teacher_layers = s_names, t_names
        s_shapes = _shapes_of(self.student, example_input, s_names)
        t_shapes = _shapes_of(self.teacher, example_input, t_names)
        for i, (ss, ts) in enumerate(zip(s_shapes, t_shapes)):
            needs = cfg.method in ("hint", "ab") or (cfg.method == "fsp" and ss[1] != ts[1])
            if needs:
                if len(ss) not in (2, 4) or len(ts) not in (2, 4):
                    raise ConfigError(f"method {cfg.method!r} adapts (B, C, H, W) or (B, C) features; layers "
                                      f"{s_names[i]!r} {ss} and {t_names[i]!r} {ts} are neither")
                self.adapters[str(i)] = feat.HintAdapter(ss[1], ts[1])
        self._caps = (FeatureCapture(self.student, s_names), FeatureCapture(self.teacher, t_names))

    def _setup_weights(self) -> None:
        cfg = self.config
        s_names = cfg.student_layers or weight_layers(self.student)
        t_names = cfg.teacher_layers or weight_layers(self.teacher)
        s_names, t_names = _pair(s_names, t_names)
        for s, t in zip(s_names, t_names):
            ws, wt = (getattr(find_module(m, n), "weight", None) for m, n in ((self.student, s), (self.teacher, t)))
            if not isinstance(ws, torch.Tensor) or not isinstance(wt, torch.Tensor):
                raise ConfigError(f"weight matching pairs modules with a weight; {s!r} or {t!r} has none")
            self.weight_maps.append(WeightMatcher(ws.shape, wt.shape, cfg.rank))
        self.student_layers, self.teacher_layers = s_names, t_names

    def _keep_input(self, module: nn.Module, args: tuple):
        x = args[0]
        if self.config.method == "at_grad" and module.training and torch.is_grad_enabled():
            x = x.detach().requires_grad_(True)      # the student's ∂CE/∂x comes from this very forward
            self._x = x
            return (x,) + tuple(args[1:])
        self._x = x
        return None

    @property
    def last_input(self) -> torch.Tensor | None:
        """The batch the student's latest forward was called with."""
        return self._x

    def loss(self, x: torch.Tensor, y: torch.Tensor, student_logits: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss of the batch ``x`` (B, …), labels ``y`` (B,), and the student's logits (B, classes) from
        its forward on ``x`` (which also filled the feature hooks), plus the parts for logging."""
        cfg = self.config
        if cfg.method == "none":
            ce = F.cross_entropy(student_logits, y, label_smoothing=self.label_smoothing)
            return ce, {"ce": float(ce.detach())}
        needs_teacher = cfg.alpha > 0 or cfg.only_where_teacher_correct or cfg.method in FEATURE_METHODS
        t_logits, t_map = self._teacher(x, y) if needs_teacher or cfg.method == "at_grad" else (None, None)
        parts: dict[str, float] = {}
        total = self._logit_terms(student_logits, t_logits, y, parts)
        beta = cfg.feature_weight
        if cfg.method != "kd" and beta > 0:
            f = self._feature_term(x, y, student_logits, t_map)
            parts[cfg.method] = float(f.detach())
            total = total + beta * f
        return total, parts

    def _teacher(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher logits (no graph) and, for at_grad, its normalised input-gradient map."""
        self.teacher.eval()
        if self.config.method == "at_grad":
            with torch.enable_grad():
                xr = x.detach().requires_grad_(True)
                logits = self.teacher(xr)
                (g,) = torch.autograd.grad(F.cross_entropy(logits.float(), y), xr)
            return logits.detach(), feat.input_gradient_map(g, self.config.at_p)
        with torch.no_grad():
            return self.teacher(x), None

    def _logit_terms(self, s_logits: torch.Tensor, t_logits: torch.Tensor | None, y: torch.Tensor,
                     parts: dict[str, float]) -> torch.Tensor:
        cfg, a = self.config, self.config.alpha
        if not cfg.only_where_teacher_correct:
            ce = F.cross_entropy(s_logits, y, label_smoothing=self.label_smoothing)
            parts["ce"] = float(ce.detach())
            if a == 0:
                return ce
            kd = kd_loss(s_logits, t_logits, cfg.temperature)
            parts["kd"] = float(kd.detach())
            return (1 - a) * ce + a * kd
        ce_i = F.cross_entropy(s_logits.float(), y, reduction="none", label_smoothing=self.label_smoothing)  # (B,)
        kd_i = kd_per_sample(s_logits, t_logits, cfg.temperature)                                            # (B,)
        taught = teacher_teaches(s_logits, t_logits, y)                                                      # (B,)
        parts.update(ce=float(ce_i.mean().detach()), kd=float(kd_i.mean().detach()),
                     taught_fraction=float(taught.float().mean()))
        return torch.where(taught, (1 - a) * ce_i + a * kd_i, ce_i).mean()

    def _feature_term(self, x: torch.Tensor, y: torch.Tensor, s_logits: torch.Tensor,
                      t_map: torch.Tensor | None) -> torch.Tensor:
        cfg = self.config
        if cfg.method == "weights":
            mods = [(find_module(self.student, s), find_module(self.teacher, t))
                    for s, t in zip(self.student_layers, self.teacher_layers)]
            return sum(m(ms.weight, mt.weight) for m, (ms, mt) in zip(self.weight_maps, mods))
        if cfg.method == "at_grad":
            return feat.gradient_attention_loss(self._student_gradient_map(x, y, s_logits), t_map)
        s_feats, t_feats = self._caps[0].get(), self._caps[1].get()
        if cfg.method == "at":
            return sum(feat.attention_loss(s, t, cfg.at_p) for s, t in zip(s_feats, t_feats))
        if cfg.method == "rkd":
            return sum(rel.rkd_loss(s, t) for s, t in zip(s_feats, t_feats))
        if cfg.method == "sp":
            return sum(rel.sp_loss(s, t) for s, t in zip(s_feats, t_feats))
        if cfg.method == "hint":
            return sum(self.adapters[str(i)](s, t) for i, (s, t) in enumerate(zip(s_feats, t_feats)))
        t_maps = [feat._as_map(t, "teacher features") for t in t_feats]
        adapted = [self.adapters[str(i)].project(s, t.shape[-2:]) if str(i) in self.adapters else s
                   for i, (s, t) in enumerate(zip(s_feats, t_maps))]
        if cfg.method == "ab":
            return sum(feat.ab_loss(s, t, cfg.margin) for s, t in zip(adapted, t_maps))
        return sum(rel.fsp_loss(adapted[i], adapted[i + 1], t_maps[i], t_maps[i + 1])  # method fsp
                   for i in range(len(adapted) - 1))

    def _student_gradient_map(self, x: torch.Tensor, y: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
        """∂CE/∂x of the student as a map that stays differentiable; reuses the training forward when the
        pre-hook made its input a leaf that requires grad, else runs one more forward."""
        xr = self._x
        if xr is not None and xr.requires_grad and s_logits.requires_grad and xr.shape == x.shape:
            (g,) = torch.autograd.grad(F.cross_entropy(s_logits.float(), y), xr, create_graph=True)
            return feat.input_gradient_map(g, self.config.at_p)
        return feat.gradient_attention_maps(self.student, x, y, self.config.at_p, create_graph=True)

    def close(self) -> None:
        """Remove every hook this distiller put on the two models."""
        self._hook.remove()
        if self._caps is not None:
            for c in self._caps:
                c.close()

    def __enter__(self) -> "Distiller":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def teacher_teaches(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the teacher predicts ``y`` and gives it more probability than the student (T = 1)."""
    p_t = torch.softmax(teacher_logits.float(), -1).gather(1, y[:, None])[:, 0]
    p_s = torch.softmax(student_logits.detach().float(), -1).gather(1, y[:, None])[:, 0]
    return (teacher_logits.argmax(-1) == y) & (p_t > p_s)


@torch.no_grad()
def _shapes_of(model: nn.Module, x: torch.Tensor, names: tuple[str, ...]) -> list[tuple[int, ...]]:
    """Output shapes of ``names`` for one eval-mode forward of ``x``."""
    order = {n: s for n, _, s in output_shapes(model, x)}
    missing = [n for n in names if n not in order]
    if missing:
        raise ConfigError(f"module(s) {missing} of {type(model).__name__} did not return a tensor in a forward "
                          "pass; pick modules the forward calls")
    return [order[n] for n in names]
