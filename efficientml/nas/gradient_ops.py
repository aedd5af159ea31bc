"""The continuous relaxation of an :class:`~efficientml.nas.space.MBSpace` for gradient-based NAS
(:mod:`efficientml.nas.gradient`): a :class:`MixedNet` whose every block slot is a :class:`MixedOp`
over the slot's candidates, with one architecture vector α per slot kept apart from the weights.

Candidates of a slot: one :class:`~efficientml.models.mobilenetv2.InvertedResidual` per
``(kernel, expand)`` of the space (kernel-major order), plus ``skip`` (the identity) for slots at or
beyond their stage's min depth, so depth is searchable: choosing skip removes the block (such slots
are stride 1 with equal channels, so the identity has the block's shape). Candidates share no
weights. A mixed op runs in one of three modes:

- ``"mixed"`` (DARTS): ``y = Σ_i softmax(α)_i · op_i(x)``, every candidate runs;
- ``"binary"`` (ProxylessNAS weight step): one path ``j ~ softmax(α)`` runs, ``y = op_j(x)``;
- ``"two_path"`` (ProxylessNAS α step): two distinct paths ``{a, b} ~ softmax(α)`` are drawn, the
  active one among them with the renormalized ``p̃ = softmax(α_{a,b})``;
  ``y = g_a·op_a(x) + g_b·op_b(x)`` with binary gates ``g`` (value one-hot) whose gradient is
  straight-through, ``∂g/∂α = ∂p̃/∂α``, so
  ``∂L/∂α_i = Σ_{j∈{a,b}} ∂L/∂g_j · p̃_j(δ_ij − p̃_i)`` with ``∂L/∂g_j = ⟨∂L/∂y, op_j(x)⟩`` — the
  estimator of ProxylessNAS' two-path variant. Only the active path keeps activations for backward;
  the inactive one runs forward under ``no_grad`` (its output is needed for ``∂L/∂g_b``).

:meth:`MixedNet.derive` reads the discrete :class:`~efficientml.nas.space.Arch` off α (argmax per
slot; the depth rule is in its docstring) and :meth:`MixedNet.extract` copies the chosen candidates
into the plain :class:`~efficientml.models.mbnet.MBNet` of that arch (same function when α is one-hot).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.errors import ConfigError
from efficientml.models.mbnet import MBNet
from efficientml.models.mobilenetv2 import ConvBNReLU, InvertedResidual, torchvision_init
from efficientml.nas.ofa import resize
from efficientml.nas.space import Arch, MBSpace
from efficientml.nas.subnet import build_subnet

Choice = tuple[int, float]  # (kernel, expand) of an inverted bottleneck; None stands for the skip candidate
MODES = ("mixed", "binary", "two_path")


def choice_name(choice: Choice | None) -> str:
    """``"k3-e6"`` for an inverted bottleneck, ``"skip"`` for the identity."""
    return "skip" if choice is None else f"k{choice[0]}-e{choice[1]}"


class MixedOp(nn.Module):
    """The candidates of one block slot (module docstring); α is passed in, not held."""

    def __init__(self, c_in: int, c_out: int, stride: int, choices: list[Choice], skip: bool):
        super().__init__()
        if skip and (stride != 1 or c_in != c_out):
            raise ConfigError(f"a skip candidate needs stride 1 and equal channels, got {c_in}→{c_out} "
                              f"at stride {stride}")
        self.choices: list[Choice | None] = list(choices) + ([None] if skip else [])
        self.candidates = nn.ModuleList([InvertedResidual(c_in, c_out, stride, e, k) for k, e in choices]
                                        + ([nn.Identity()] if skip else []))
        self.last_sample: tuple[int, ...] = ()  # indices run by the last sampled forward (active first)

    def forward(self, x: torch.Tensor, alpha: torch.Tensor, mode: str = "mixed",
                generator: torch.Generator | None = None) -> torch.Tensor:
        """x (B, c_in, H, W), alpha (n_candidates,) → (B, c_out, H/stride, W/stride)."""
        if mode == "mixed":
            p = F.softmax(alpha, dim=0)  # (n,)
            return sum(p[i] * op(x) for i, op in enumerate(self.candidates))
        probs = F.softmax(alpha.detach().float(), dim=0).cpu()
        if mode == "binary" or int((probs > 0).sum()) < 2:  # a pair needs two paths of non-zero probability
            j = int(torch.multinomial(probs, 1, generator=generator))
            self.last_sample = (j,)
            return self.candidates[j](x)
        if mode != "two_path":
            raise ConfigError(f"mixed op mode {mode!r} is not one of {MODES}")
        return self._two_path(x, alpha, probs, generator)

    def _two_path(self, x: torch.Tensor, alpha: torch.Tensor, probs: torch.Tensor,
                  generator: torch.Generator | None) -> torch.Tensor:
        pair = torch.multinomial(probs, 2, replacement=False, generator=generator)  # (2,) distinct paths
        sub = F.softmax(alpha[pair.to(alpha.device)], dim=0)  # p̃ over the pair, differentiable in α
        c = int(torch.multinomial(sub.detach().float().cpu(), 1, generator=generator))
        hard = F.one_hot(torch.tensor(c), 2).to(sub)
        gates = hard + (sub - sub.detach())  # value exactly one-hot; gradient straight through to p̃
        active, other = int(pair[c]), int(pair[1 - c])
        self.last_sample = (active, other)
        y = self.candidates[active](x)
        with torch.no_grad():  # forward only: ∂L/∂g_other = ⟨∂L/∂y, op_other(x)⟩, no activations kept
            y_other = self.candidates[other](x).detach()  # detached: skip returns x itself
        return gates[c] * y + gates[1 - c] * y_other  # value: y exactly (gates[1 − c] is 0)


class MixedNet(nn.Module):
    """The relaxed space at one width and resolution: stem → one :class:`MixedOp` per slot → head →
    pool → classifier, as :class:`~efficientml.models.mbnet.MBNet`. Inputs are resized to
    ``resolution`` (default the space's largest). ``mode`` is one of :data:`MODES`; sampling draws
    from ``generator``."""

    def __init__(self, space: MBSpace, width: float | None = None, resolution: int | None = None):
        super().__init__()
        self.space = space
        self.width = max(space.widths) if width is None else width
        self.resolution = max(space.resolutions) if resolution is None else resolution
        if self.width not in space.widths:
            raise ConfigError(f"width {self.width} is not one of the space's widths {space.widths}")
        if self.resolution not in space.resolutions:
            raise ConfigError(f"resolution {self.resolution} is not one of the space's {space.resolutions}")
        choices = [(k, e) for k in space.kernels for e in space.expands]
        c = space.stem_channels(self.width)
        self.stem = ConvBNReLU(space.in_channels, c, 3, space.stem_stride)
        self.slots = nn.ModuleList()
        for (_, dmax, s), lo, c_out in zip(space.stages, space.min_depths, space.stage_channels(self.width)):
            for i in range(dmax):
                self.slots.append(MixedOp(c if i == 0 else c_out, c_out, s if i == 0 else 1, choices, i >= lo))
            c = c_out
        head = space.head_channels(self.width)
        self.head = ConvBNReLU(c, head, 1)
        self.classifier = nn.Sequential(nn.Dropout(space.dropout), nn.Linear(head, space.num_classes))
        _init_weights(self)
        self.alphas = nn.ParameterList([nn.Parameter(torch.zeros(len(op.choices))) for op in self.slots])
        self.mode = "mixed"
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_channels, H, W) → logits (B, num_classes)."""
        x = self.stem(resize(x, self.resolution))
        for op, alpha in zip(self.slots, self.alphas):
            x = op(x, alpha, self.mode, self.generator)
        return self.classifier(self.head(x).mean(dim=(2, 3)))

    def arch_parameters(self) -> list[nn.Parameter]:
        """α: one (n_candidates,) logit vector per slot."""
        return list(self.alphas)

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not α."""
        arch = {id(a) for a in self.alphas}
        return [p for p in self.parameters() if id(p) not in arch]

    def probs(self) -> list[torch.Tensor]:
        """softmax(α) per slot, detached."""
        return [F.softmax(a.detach(), dim=0) for a in self.alphas]

    def choices(self) -> list[Choice | None]:
        """The argmax candidate of every slot (ties: the first)."""
        return [op.choices[int(a.detach().argmax())] for op, a in zip(self.slots, self.alphas)]

    def derive(self) -> Arch:
        """The discrete architecture of α: argmax per slot. A stage's depth is the number of its leading
        non-skip slots — the first skip ends the stage and the slots after it are dropped whatever they
        chose — clamped below by the stage's min depth (slots below it have no skip). Canonical form."""
        picks, depths, slot = self.choices(), [], 0
        for (_, dmax, _), lo in zip(self.space.stages, self.space.min_depths):
            stage = picks[slot:slot + dmax]
            depths.append(max(lo, next((i for i, ch in enumerate(stage) if ch is None), dmax)))
            slot += dmax
        big = (max(self.space.kernels), max(self.space.expands))
        kernels = tuple((big if ch is None else ch)[0] for ch in picks)
        expands = tuple((big if ch is None else ch)[1] for ch in picks)
        arch = self.space.canonical(Arch(self.resolution, self.width, tuple(depths), kernels, expands))
        self.space.check(arch)
        return arch

    @torch.no_grad()
    def extract(self, arch: Arch | None = None) -> MBNet:
        """The plain :class:`MBNet` of ``arch`` (default :meth:`derive`) holding this net's stem, head,
        classifier and, per active block, the weights of the slot's candidate of that kernel/expand."""
        arch = self.derive() if arch is None else arch
        if arch.width != self.width or arch.resolution != self.resolution:
            raise ConfigError(f"the architecture's width/resolution {arch.width}/{arch.resolution} are not this "
                              f"net's {self.width}/{self.resolution}")
        net = build_subnet(self.space, arch)
        feats = list(net.features)
        feats[0].load_state_dict(self.stem.state_dict())
        feats[-1].load_state_dict(self.head.state_dict())
        net.classifier.load_state_dict(self.classifier.state_dict())
        for block, (slot, _, _, _, expand, kernel) in zip(feats[1:-1], self.space.blocks(arch)):
            op = self.slots[slot]
            block.load_state_dict(op.candidates[op.choices.index((kernel, expand))].state_dict())
        return net.train(self.training)


def _init_weights(net: nn.Module) -> None:
    """The zoo's (torchvision's) initialization, so a candidate starts as a fresh ``build_subnet`` block."""
    torchvision_init(net)
