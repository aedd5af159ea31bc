"""Born-again networks (Furlanello et al. 2018): self-distillation over generations of one architecture.

Generation 0 is ``first_teacher`` or, if none is given, a student trained alone (plain cross-entropy on
:func:`efficientml.train.fit`). Generation g ≥ 1 is a fresh ``make_student(g)``, distilled offline
(:func:`~efficientml.distill.offline.distill`, ``config``'s method) from generation g − 1, which is frozen
while it teaches. The members of the final :class:`~efficientml.distill.ensemble.Ensemble` (mean of the
softmax probabilities) are the generations of the student architecture: 1 … G, and 0 when it was trained
here.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch.nn as nn

from efficientml.core.errors import ConfigError
from efficientml.distill.ensemble import Ensemble
from efficientml.distill.methods import DistillConfig
from efficientml.distill.offline import distill
from efficientml.train.config import TrainConfig
from efficientml.train.loop import evaluate, fit

__all__ = ["Ensemble", "born_again"]


def born_again(make_student: Callable[[int], nn.Module], first_teacher: nn.Module | None, train_loader: Iterable,
               train: TrainConfig, generations: int = 2, config: DistillConfig | None = None,
               eval_loader: Iterable | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Train ``generations`` born-again students, each distilled from the one before.

    ``make_student(g)`` builds generation g's fresh student (same architecture for every g; the index lets it
    seed its initialisation). ``config`` defaults to ``DistillConfig(method="kd", temperature=4, alpha=0.9)``.
    ``train`` is every generation's recipe. A teacher's ``requires_grad`` flags are restored once its student
    is trained, so every returned model is as trainable as it was built.

    Returns ``{"models": [gen 0, …, gen G], "histories": [History.to_dict() per trained generation, None for a
    given first_teacher], "ensemble": Ensemble of the members, "members": their generation indices}`` and,
    with ``eval_loader``, ``eval_accuracy`` (per generation) and ``ensemble_accuracy`` (top-1, percent)."""
    if isinstance(generations, bool) or not isinstance(generations, int) or generations < 1:
        raise ConfigError(f"generations must be a positive integer (students after generation 0), got "
                          f"{generations!r}")
    config = config or DistillConfig(method="kd", temperature=4.0, alpha=0.9)
    if first_teacher is None:
        first = make_student(0)
        histories: list[dict | None] = [fit(first, train_loader, train, progress=progress).to_dict()]
    else:
        first, histories = first_teacher, [None]
    models = [first]
    for g in range(1, generations + 1):
        teacher, student = models[-1], make_student(g)
        if any(student is m for m in models):
            raise ConfigError("make_student must build a fresh model for every generation; it returned one "
                              "built before")
        flags = [p.requires_grad for p in teacher.parameters()]
        histories.append(distill(student, teacher, train_loader, config, train, progress=progress).to_dict())
        for p, f in zip(teacher.parameters(), flags):
            p.requires_grad_(f)
        models.append(student)
    members = list(range(0 if first_teacher is None else 1, generations + 1))
    ensemble = Ensemble([models[g] for g in members])
    out: dict[str, Any] = {"models": models, "histories": histories, "ensemble": ensemble, "members": members}
    if eval_loader is not None:
        out["eval_accuracy"] = [evaluate(m, eval_loader)["accuracy"] for m in models]
        out["ensemble_accuracy"] = evaluate(ensemble, eval_loader)["accuracy"]
    return out
