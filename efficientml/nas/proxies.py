"""Zero-shot NAS proxies: score an untrained classifier from one batch, no training.

Every proxy is ``fn(model, x, y=None, seed=0) -> float`` (higher is better), with ``x`` a batch of shape
(B, C, H, W) and ``y`` (B,) class indices where the proxy needs labels. ``score(model, name, x, y, seed)``
is the entry point; ``PROXIES`` maps names to functions.

    name       needs y  mode   what it measures
    params     no       —      number of parameters (the baseline every proxy must beat)
    zen        no       train  log E‖f(x) − f(x + αε)‖ + Σ_BN log σ̄, Gaussian weights (Lin et al. 2021)
    gradsign   yes      train  Σ_θ |Σ_i sign(∂ℓ_i/∂θ)| over per-sample gradients (Zhang & Jia 2022)
    synflow    no       eval   Σ |θ ⊙ ∂R/∂θ|, θ → |θ|, R = Σ f(1), float64 (Tanaka et al. 2020)
    grad_norm  yes      train  ‖∂L/∂θ‖₂ of cross-entropy over all parameters
    snip       yes      train  Σ |θ ⊙ ∂L/∂θ| (Lee et al. 2019)
    naswot     no       train  log|det K|, K_ij = ReLU units on which samples i, j agree (Mellor et al. 2021)
    jacob_cov  no       train  −Σ log(λ + k) + 1/(λ + k), λ of the input-Jacobian correlations (Mellor et al.)

θ ranges over every parameter of the model (weights, biases, norm affines), whether or not the caller
froze it. "train" means the proxy runs the model with batch statistics in BatchNorm, as the papers do at
initialization. Each proxy works on a deepcopy, so the caller's parameters, buffers, gradients and
train/eval mode are untouched, and draws its randomness (Zen's inputs and weights, dropout) from a
forked RNG seeded with ``seed``: the same seed gives the same score and the global RNG is not advanced.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from efficientml.core.errors import ConfigError, ShapeError, UnsupportedError

Proxy = Callable[..., float]

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
NORMS = BATCH_NORMS + (nn.GroupNorm, nn.LayerNorm)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)  # when the output is 1×1
RECTIFIERS = (F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu6,
              F.hardtanh)  # naswot's units (hardtanh only with min_val 0): active where the output is > 0
JACOB_COV_K = 1e-5


@contextlib.contextmanager
def _seeded(seed: int, x: torch.Tensor) -> Iterator[None]:
    """Run the block on a forked global RNG (CPU and, for a CUDA ``x``, its device) seeded with ``seed``."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _working_copy(model: nn.Module, train: bool) -> nn.Module:
    """A deepcopy in train or eval mode whose parameters all require grad and hold no gradient."""
    work = copy.deepcopy(model)
    work.train(train)
    for p in work.parameters():
        p.requires_grad_(True)
        p.grad = None
    return work


def _labels(name: str, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    if y is None:
        raise ConfigError(f"proxy {name!r} needs labels y, a ({x.shape[0]},) tensor of class indices")
    return y.to(x.device)


def _ce_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(θ, ∂L/∂θ) for every parameter of a train-mode copy that the loss reaches; L = mean cross-entropy."""
    work = _working_copy(model, train=True)
    ps = list(work.parameters())
    loss = F.cross_entropy(work(x), y)
    grads = torch.autograd.grad(loss, ps, allow_unused=True)
    return [(p.detach(), g) for p, g in zip(ps, grads) if g is not None]


def params(model: nn.Module, x: torch.Tensor | None = None, y: torch.Tensor | None = None, seed: int = 0) -> float:
    """Number of parameters (shared tensors counted once); ``x``, ``y``, ``seed`` are unused."""
    return float(sum(p.numel() for p in model.parameters()))


def grad_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, seed: int = 0) -> float:
    """Global L2 norm of ∂L/∂θ over all parameters, L the mean cross-entropy of the batch at init."""
    y = _labels("grad_norm", x, y)
    with _seeded(seed, x):
        grads = _ce_grads(model, x, y)
    return math.sqrt(sum(float(g.double().pow(2).sum()) for _, g in grads))


def snip(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, seed: int = 0) -> float:
    """SNIP connection sensitivity summed over the net: Σ_θ |θ ⊙ ∂L/∂θ|, L the mean cross-entropy."""
    y = _labels("snip", x, y)
    with _seeded(seed, x):
        grads = _ce_grads(model, x, y)
    return sum(float((p.double() * g.double()).abs().sum()) for p, g in grads)


def gradsign(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, seed: int = 0) -> float:
    """GradSign: Σ over parameter entries of |Σ_i sign(g_i)|, g_i = ∂ℓ_i/∂θ the gradient of sample i's
    cross-entropy term.

    One train-mode forward of the whole batch, then one backward per sample: BatchNorm normalizes with the
    batch statistics, as for the other gradient proxies. (The reference code runs each sample alone,
    which degenerates BN statistics and fails on BN over 1×1 maps.) An unreached parameter contributes 0."""
    y = _labels("gradsign", x, y)
    work = _working_copy(model, train=True)
    ps = list(work.parameters())
    signs = [torch.zeros_like(p) for p in ps]  # Σ_i sign(g_i), exact integers
    with _seeded(seed, x):
        losses = F.cross_entropy(work(x), y, reduction="none")  # (B,)
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(losses[i], ps, retain_graph=i + 1 < x.shape[0], allow_unused=True)
        for s, g in zip(signs, grads):
            if g is not None:
                s.add_(g.sign())
    return sum(float(s.abs().sum(dtype=torch.float64)) for s in signs)


def synflow(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, seed: int = 0) -> float:
    """SynFlow: Σ_θ |θ ⊙ ∂R/∂θ| with every parameter replaced by |θ| and R = Σ f(1), 1 an all-ones input
    of shape (1, C, H, W); data-free, computed in float64 so deep products do not overflow.

    BatchNorm runs in eval mode with its running statistics reset to (mean 0, var 1), so each BN is the
    positive per-channel affine |γ|·x/√(1 + eps) + |β| whatever the caller's buffers hold (a BN built with
    ``track_running_stats=False`` normalizes the one-sample batch instead)."""
    work = _working_copy(model, train=False).double()
    with torch.no_grad():
        for m in work.modules():
            if isinstance(m, BATCH_NORMS) and m.track_running_stats:
                m.reset_running_stats()
        for p in work.parameters():
            p.abs_()
    ps = list(work.parameters())
    ones = torch.ones((1, *x.shape[1:]), dtype=torch.float64, device=x.device)  # (1, C, H, W)
    with _seeded(seed, x):
        r = work(ones).sum()
    grads = torch.autograd.grad(r, ps, allow_unused=True)
    return sum(float((p.detach() * g).abs().sum()) for p, g in zip(ps, grads) if g is not None)


class _ActivationCodes(TorchFunctionMode):
    """Adds each rectifier call's binary code agreements to ``kernel`` (B, B): modules and functional calls
    alike, since ``nn.ReLU`` / ``nn.ReLU6`` forward through the functions in ``RECTIFIERS``."""

    def __init__(self, kernel: torch.Tensor):
        super().__init__()
        self.kernel, self.calls = kernel, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))  # the mode is off inside, so F.relu6 → hardtanh is seen once
        lower = _arg(args, kwargs, 1, "min_val", -1.0) if func is F.hardtanh else 0.0
        if func in RECTIFIERS and lower == 0.0 and torch.is_tensor(out) and out.dim() >= 1 \
                and out.shape[0] == self.kernel.shape[0]:
            c = (out.detach().reshape(out.shape[0], -1) > 0).double()  # (B, units) binary code
            self.kernel.add_(c @ c.T + (1 - c) @ (1 - c).T)  # agreements = N_A − Hamming distance
            self.calls += 1
        return out


def _arg(args: tuple, kwargs: dict | None, i: int, name: str, default: float) -> float:
    return args[i] if len(args) > i else (kwargs or {}).get(name, default)


def naswot(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, seed: int = 0) -> float:
    """NASWOT: log|det K| with K = N_A − d_H, i.e. K_ij counts the rectifier units on which samples i and j
    are both active or both inactive; a unit is one output element of one ReLU / ReLU6 call (an
    ``nn.ReLU`` module or ``F.relu``, ``torch.relu``, ``x.relu()``, ``F.hardtanh(x, 0, ·)``) whose output
    has the batch as first dimension. One no-grad forward of a train-mode copy.

    Identical codes for all B > 1 samples make K = N_A·11ᵀ singular: the score is −inf."""
    b = x.shape[0]
    work = _working_copy(model, train=True)
    codes = _ActivationCodes(torch.zeros(b, b, dtype=torch.float64, device=x.device))  # exact integer counts
    with torch.no_grad(), _seeded(seed, x), codes:
        work(x)
    if codes.calls == 0:
        raise UnsupportedError("naswot needs ReLU activations (nn.ReLU, ReLU6 or F.relu), but none ran in the "
                               "forward pass")
    return float(torch.linalg.slogdet(codes.kernel).logabsdet)


def jacob_cov(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, seed: int = 0) -> float:
    """Jacobian covariance (first NASWOT paper): J_i = ∂(Σ f(x))/∂x_i flattened per sample (train-mode
    copy, so BN couples the samples as in the reference), C = correlation matrix of the rows of J (B, B),
    score = −Σ_λ [log(λ + k) + 1/(λ + k)] over the eigenvalues λ ≥ 0 of C, k = 1e-5.

    A sample whose Jacobian is constant has no correlation: the score is −inf (a dead network)."""
    work = _working_copy(model, train=True)
    xi = x.detach().clone().requires_grad_(True)
    with _seeded(seed, x):
        out = work(xi)
    (jac,) = torch.autograd.grad(out.sum(), xi)
    jac = jac.reshape(x.shape[0], -1).double()  # (B, C·H·W)
    jac = jac - jac.mean(dim=1, keepdim=True)
    norms = jac.norm(dim=1)
    if bool((norms == 0).any()):
        return -math.inf
    unit = jac / norms[:, None]
    lam = torch.linalg.eigvalsh(unit @ unit.T).clamp_min(0.0)  # C is PSD; clamp rounding below 0
    return float(-(torch.log(lam + JACOB_COV_K) + 1.0 / (lam + JACOB_COV_K)).sum())


def _gaussian_init(model: nn.Module) -> None:
    """Zen-NAS init, in place: weights of rank ≥ 2 ~ N(0, 1), biases 0, norm layers γ = 1, β = 0."""
    with torch.no_grad():
        for m in model.modules():
            for name, p in m.named_parameters(recurse=False):
                if isinstance(m, NORMS) and name == "weight":
                    p.fill_(1.0)
                elif name == "bias":
                    p.zero_()
                elif p.dim() >= 2:
                    p.normal_()


class _BatchNormScale(TorchFunctionMode):
    """Sums log √(mean_c batch variance of the input) over every ``F.batch_norm`` call: ``nn.BatchNorm*``
    modules and wrappers that call the function with sliced buffers (a supernet's dynamic BN) alike."""

    def __init__(self) -> None:
        super().__init__()
        self.log_sigma = 0.0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.batch_norm:
            inp = args[0] if args else kwargs["input"]  # (B, C, ...)
            var = inp.transpose(0, 1).flatten(1).var(dim=1, unbiased=False)  # (C,), what a momentum-1 BN keeps
            self.log_sigma += 0.5 * float(torch.log(var.mean()))
        return func(*args, **(kwargs or {}))


def _zen_forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One forward: (the pre-pooling feature map (B, C, H, W), Σ_BN log √(mean_c batch variance)).

    The feature map is the last 4-D module output in execution order, except that a global pool (a
    pooling module of ``GLOBAL_POOLS`` with a 1×1 output) contributes its input, and 1×1 maps computed
    after it (a squeeze-excite branch, a container holding the pool) are skipped until a larger map
    appears. Works for ``x.mean((2, 3))`` heads (no pool module) and ``nn.AdaptiveAvgPool2d`` heads alike."""
    state: dict = {"feat": None, "pooled": False}

    def hook(m: nn.Module, inp: tuple, out: object) -> None:
        if not (torch.is_tensor(out) and out.dim() == 4):
            return
        one_by_one = out.shape[2] * out.shape[3] == 1
        if isinstance(m, GLOBAL_POOLS) and one_by_one:
            state["feat"], state["pooled"] = inp[0], True
        elif not (state["pooled"] and one_by_one):
            state["feat"], state["pooled"] = out, False

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    bn = _BatchNormScale()
    try:
        with bn:
            model(x)
    finally:
        for h in handles:
            h.remove()
    if state["feat"] is None:
        raise UnsupportedError("zen needs a 4-D feature map, but no module of the model outputs a (B, C, H, W) tensor")
    return state["feat"], bn.log_sigma


def zen(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, seed: int = 0,
        alpha: float = 0.01, repeats: int = 3) -> float:
    """Zen-score: mean over ``repeats`` draws of log E_i‖f(x_i) − f(x_i + α·ε_i)‖_F + Σ_BN log σ̄_BN.

    Data-free: ``x`` gives only the shape and device; x, ε ~ N(0, 1). Each draw re-initializes a
    train-mode copy with ``_gaussian_init`` (so the score depends on the architecture and the seed, not
    on the caller's weights or buffers); its dropout modules are off, so f(x) and f(x + αε) are the same
    function. f is the pre-pooling feature map (see ``_zen_forward``) and σ̄² the channel mean of each
    BatchNorm's batch variance at the forward of x (every ``F.batch_norm`` call, so dynamic BNs count).
    The paper's norm is Frobenius (its reference code uses the L1 norm; for ranking the two agree closely)."""
    work = _working_copy(model, train=True)
    for m in work.modules():
        if isinstance(m, DROPOUTS):
            m.eval()
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    scores = []
    with torch.no_grad(), _seeded(seed, x):
        for _ in range(repeats):
            _gaussian_init(work)
            x0 = torch.randn(x.shape, dtype=dtype, device=x.device)  # (B, C, H, W)
            x1 = x0 + alpha * torch.randn_like(x0)
            f0, log_sigma = _zen_forward(work, x0)
            f1, _ = _zen_forward(work, x1)
            delta = (f0 - f1).flatten(1).double().norm(dim=1).mean()
            scores.append(float(torch.log(delta)) + log_sigma)
    return sum(scores) / len(scores)


PROXIES: dict[str, Proxy] = {
    "params": params,
    "zen": zen,
    "gradsign": gradsign,
    "synflow": synflow,
    "grad_norm": grad_norm,
    "snip": snip,
    "naswot": naswot,
    "jacob_cov": jacob_cov,
}


def score(model: nn.Module, name: str, x: torch.Tensor, y: torch.Tensor | None = None, seed: int = 0) -> float:
    """Score ``model`` with proxy ``name`` on batch ``x`` (B, C, H, W) and labels ``y`` (B,) if it needs them."""
    fn = PROXIES.get(name)
    if fn is None:
        close = difflib.get_close_matches(str(name), PROXIES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown zero-shot proxy {name!r}{hint}; expected one of {', '.join(sorted(PROXIES))}")
    if not torch.is_tensor(x) or x.dim() < 2:
        raise ShapeError(f"proxy input x must be a batch tensor of shape (B, C, H, W), got {_shape(x)}")
    if y is not None and tuple(y.shape) != (x.shape[0],):
        raise ShapeError(f"proxy labels y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
    return fn(model, x, y, seed=seed)


def _shape(x: object) -> str:
    return f"shape {tuple(x.shape)}" if torch.is_tensor(x) else f"a {type(x).__name__}"
