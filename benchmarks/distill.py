"""Knowledge distillation (issue #20): every method over several seeds with mean ± std, on Fashion-MNIST, plus
distillation as the recovery step after pruning and an LLM made shallower. Writes
benchmarks/results/distill.json (schema: ../shared/BENCHMARKS.md).

CPU, 2 threads. The teacher is the trained course VGG (width 0.25, checkpoints/vgg_fmnist.safetensors,
94.25 %); the student the small CNN at width 0.25 (8 and 16 channels, 18,370 parameters). Every arm of
a seed trains for the same epochs on the same seeded training subset with the same recipe (SGD,
cosine schedule); the student alone is the control. Parts (``--parts``; default all):

- ``kd``: logit KD (alpha 0.9; T chosen from 1, 2, 4 by seed 0's accuracy on 5000 held-out training images,
  never on the test set) → ``kd_gain_points`` (mean over seeds of KD − alone, the std of both arms);
- ``features``: FitNets hints, attention transfer (activations and gradients), activation boundaries,
  FSP, RKD, similarity-preserving, each with the KD term → ``best_feature_or_relational_gain_points``;
  the rule that the teacher teaches only where it beats the student on the true label, beside it;
- ``peers`` (:mod:`benchmarks.distill_peers`): Deep Mutual Learning, Be Your Own Teacher, born-again
  generations and their ensemble, NetAug, and cutout / mixup beside them → ``dml_gain_points``,
  ``byot_gain_points``, ``self_distill_gain_points``, ``netaug_gain_points``;
- ``pruned``: VGG channel-pruned until plain fine-tuning leaves ≥ 1 point, then fine-tuned with and
  without KD from the unpruned VGG at equal epochs → ``pruned_vgg_kd_recovery``;
- ``llm`` (:mod:`benchmarks.distill_llm`): SmolLM2-135M minus its 6 least influential blocks, KD vs
  plain fine-tuning on the same tokens → ``llm_kd_vs_ce_ppl_ratio``.

    python benchmarks/distill.py                            # full (the committed JSON)
    python benchmarks/distill.py --quick --out /tmp/d.json  # tiny budgets: proves every part runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from efficientml.analysis.record import (BenchmarkRecord, add_part_options, default_out, log,  # noqa: E402
                                         run_parts, selected_parts)
from benchmarks.distill_cnn import PEER_PARTS, Env, mean_std  # noqa: E402
from benchmarks.distill_llm import part_llm  # noqa: E402

FEATURE_METHODS = ("hint", "at", "at_grad", "ab", "fsp", "rkd", "sp")


def part_kd(env: Env) -> None:
    alone, kd = env.arm("alone"), env.arm("kd")
    gains = [k - a for k, a in zip(kd, alone)]
    env.rec.results["kd"] = {"alone": mean_std(alone), "kd": mean_std(kd), "gain_per_seed": gains}
    env.rec.target("kd_gain_points", statistics.mean(gains), ">=", 0.5,
                   f"test accuracy points, KD (T={env.temperature():g}, chosen on validation) − student alone, mean over seeds {list(env.seeds)}; std "
                   f"alone {mean_std(alone)['std']:.2f}, KD {mean_std(kd)['std']:.2f}")


def part_features(env: Env) -> None:
    alone = env.arm("alone")
    table = {}
    methods = tuple(m for m in FEATURE_METHODS if m in env.feature_methods)
    skipped = [m for m in FEATURE_METHODS if m not in methods]
    if skipped:
        env.rec.results.setdefault("features_not_run", skipped)
    for method in methods + ("kd_teacher_correct",):
        acc = env.arm(method)
        table[method] = {**mean_std(acc), "gain_per_seed": [a - b for a, b in zip(acc, alone)]}
        table[method]["gain"] = statistics.mean(table[method]["gain_per_seed"])
    best = max(methods, key=lambda m: table[m]["gain"])
    env.rec.results["features"] = {"methods": table, "best": best,
                                   "not_beating_alone": [m for m, v in table.items() if v["gain"] <= 0]}
    kd = env._arms.get("kd")
    kd_gain = statistics.mean(k - a for k, a in zip(kd, alone)) if kd else None
    note = f"best: {best} (per seed {[round(g, 2) for g in table[best]['gain_per_seed']]}) of {', '.join(methods)}"
    if skipped:
        note += f"; not run: {', '.join(skipped)}"
    if kd_gain is not None:
        note += f"; threshold: logit KD's gain {kd_gain:.2f}"
    env.rec.target("best_feature_or_relational_gain_points", table[best]["gain"], ">=",
                   kd_gain if kd_gain is not None else 0.5, note)


PARTS = {"kd": part_kd, "features": part_features, **PEER_PARTS, "llm": part_llm}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_part_options(ap, PARTS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="skip the validation choice of the KD temperature and use this one (the value a kd "
                         "run chose, from its JSON's temperature_selection)")
    ap.add_argument("--feature-methods", default=",".join(FEATURE_METHODS),
                    help=f"feature/relational methods of part features (default all: {','.join(FEATURE_METHODS)})")
    ap.add_argument("--reuse-arms", default=None, metavar="JSON",
                    help="accuracies per seed of arms an earlier run of this protocol measured ({arm: [acc, ...]}); "
                         "they are not trained again and the record lists them under reused_arms")
    args = ap.parse_args(argv)
    if args.merge:
        from efficientml.analysis.record import merge_records

        rec = merge_records([json.loads(Path(p).read_text()) for p in args.merge], "distill")
        rec.write(default_out("distill", False, args.out))
        return 0
    torch.set_num_threads(args.threads)
    out = default_out("distill", args.quick, args.out)
    rec = BenchmarkRecord("distill")
    env = Env(args.quick, args.seeds, rec)
    if args.temperature is not None:
        env.set_temperature(args.temperature)
    env.feature_methods = tuple(m.strip() for m in args.feature_methods.split(",") if m.strip())
    if args.reuse_arms:
        env.reuse(json.loads(Path(args.reuse_arms).read_text()))
    rec.results["protocol"] = env.protocol()

    def done(name: str, seconds: float) -> None:
        rec.results.setdefault("seconds", {})[name] = round(seconds, 1)
        rec.write(out)

    run_parts(PARTS, selected_parts(PARTS, args.parts), env, after=done)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
