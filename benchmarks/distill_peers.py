"""Part ``peers`` of benchmarks/distill.py: the methods with no pretrained teacher, each against the student
trained alone (same seeds, epochs, data and recipe as :class:`benchmarks.distill_cnn.Env`).

- Deep Mutual Learning: two students of the student's architecture trained together (CE + KL each way,
  T = 1); the gain is the mean of the two peers' accuracies (their ensemble recorded beside it).
- Be Your Own Teacher: shallow heads on the student's first stage taught by its deepest output (α 0.3,
  T 3, feature term 0.03); the gain is the deepest classifier's (the heads are dropped at inference).
- Born-again: generation 0 trained alone, generations 1 and 2 each distilled (KD, T 4, α 0.9) from the
  previous; the gain is generation 2's, the ensemble of the three recorded beside it.
- NetAug: the student trained inside supernets 1.5–3× wider that share its weights (α 1), then extracted.
- Cutout (8×8) and mixup (α 0.2), the over-fitting remedies the lecture contrasts with NetAug for a tiny
  model that under-fits.

Every gain is in test-accuracy points, mean over the seeds, with each arm's std; arms that do not beat
the student alone are listed in ``results.peers.not_beating_alone``.
"""

from __future__ import annotations

import statistics
from typing import Callable

from benchmarks.distill_cnn import Env, mean_std


def _dml(env: Env) -> Callable[[int], float]:
    from efficientml.distill import mutual_learning

    def run(seed: int) -> float:
        train, test = env.loaders(seed)
        peers = [env.student(seed), env.student(seed + 1000)]
        res = mutual_learning(peers, train, env.recipe(seed), temperature=1.0, eval_loader=test, progress=False)
        env.extra.setdefault("dml_ensemble", []).append(res["ensemble_accuracy"])
        return statistics.mean(res["eval_accuracy"])
    return run


def _byot(env: Env) -> Callable[[int], float]:
    from efficientml.distill import byot_train

    def run(seed: int) -> float:
        train, test = env.loaders(seed)
        res = byot_train(env.student(seed), train, env.recipe(seed), eval_loader=test, progress=False)
        env.extra.setdefault("byot_heads", []).append(res["head_accuracy"])
        return res["accuracy"]
    return run


def _born_again(env: Env) -> Callable[[int], float]:
    from efficientml.distill import DistillConfig, born_again

    def run(seed: int) -> float:
        train, test = env.loaders(seed)
        res = born_again(lambda g: env.student(seed + 100 * g), None, train, env.recipe(seed), generations=2,
                         config=DistillConfig(method="kd", temperature=env.temperature(), alpha=0.9),
                         eval_loader=test,
                         progress=False)
        env.extra.setdefault("born_again_generations", []).append(res["eval_accuracy"])
        env.extra.setdefault("born_again_ensemble", []).append(res["ensemble_accuracy"])
        return res["eval_accuracy"][-1]
    return run


def _netaug(env: Env) -> Callable[[int], float]:
    from efficientml.distill import netaug_train
    from efficientml.train.loop import evaluate

    def run(seed: int) -> float:
        train, test = env.loaders(seed)
        res = netaug_train(env.student(seed), train, env.recipe(seed), widths=(1.5, 2.0, 2.5, 3.0), alpha=1.0,
                           progress=False)
        return evaluate(res["model"], test)["accuracy"]
    return run


def _augmented(env: Env, kind: str) -> Callable[[int], float]:
    from efficientml.distill import CutoutLoader, MixupLoader
    from efficientml.train import fit
    from efficientml.train.loop import evaluate

    def run(seed: int) -> float:
        train, test = env.loaders(seed)
        s = env.student(seed)
        if kind == "cutout":
            fit(s, CutoutLoader(train, 8, seed=seed), env.recipe(seed), progress=False)
        else:
            loader = MixupLoader(train, 0.2, seed=seed)
            fit(s, loader, env.recipe(seed), loss_fn=loader.loss_fn, progress=False)
        return evaluate(s, test)["accuracy"]
    return run


ARMS = {"dml": _dml, "byot": _byot, "self_distill": _born_again, "netaug": _netaug,
        "cutout": lambda env: _augmented(env, "cutout"), "mixup": lambda env: _augmented(env, "mixup")}
NOTES = {"dml": "2 peers, CE + KL each way (T 1), mean of the peers' accuracies",
         "byot": "deepest classifier, heads on the first stage (α 0.3, T 3, feature 0.03)",
         "self_distill": "born-again generation 2 (KD at the chosen T, α 0.9 from generation 1, itself from "
                         "generation 0)",
         "netaug": "tiny model extracted after training inside 1.5–3× wider shared supernets (α 1)"}


def part_peers(env: Env) -> None:
    alone = env.arm("alone")
    table = {}
    for name, make in ARMS.items():
        acc = env.arm(name, make(env))
        gains = [a - b for a, b in zip(acc, alone)]
        table[name] = {**mean_std(acc), "gain_per_seed": gains, "gain": statistics.mean(gains),
                       "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0}
    extra = {k: v for k, v in env.extra.items()}
    env.rec.results["peers"] = {"alone": mean_std(alone), "methods": table, "details": extra,
                                "not_beating_alone": [m for m, v in table.items() if v["gain"] <= 0]}
    for name, note in NOTES.items():
        v = table[name]
        env.rec.target(f"{name}_gain_points", v["gain"], ">=", 0.0,  # reported; met = beats the student alone
                       f"{note}; test accuracy points − student alone, mean over seeds {list(env.seeds)}, gain std "
                       f"{v['gain_std']:.2f}, per seed {[round(g, 2) for g in v['gain_per_seed']]}; arm std "
                       f"{v['std']:.2f}, alone std {mean_std(alone)['std']:.2f}"
                       + ("; does not beat the student alone" if v["gain"] <= 0 else ""))
