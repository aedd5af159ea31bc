"""The ``ofa`` part of benchmarks/nas.py: once-for-all on Fashion-MNIST.

Data: ``--train-images`` of the training split (augmented with crops; the same images for the
supernet and for every model trained from scratch); the test split cut in two halves by a fixed
permutation: *val* (5,000 images: the accuracy predictor's labels and the searches' measured scores)
and *test* (5,000: every reported accuracy). BN re-calibration uses 10 training batches of 128.

1. progressive shrinking (full → kernel → depth → width, ``--epochs`` per phase, KD from the largest);
2. ``--scratch-subnets`` random subnets: extracted + BN re-calibrated vs the same architecture trained
   from scratch for as many epochs as the supernet's total → ``ofa_subnet_vs_scratch_points``;
3. ``--predictor-samples`` subnets measured on val: the MLP predictor trained on 80 %, its RMSE on the
   other 20 % and its error against the number of samples → ``acc_predictor_rmse_points``;
4. random and evolutionary search at the same budget (``--search-budget`` predictor evaluations, a MACs
   cap of half the largest network's), each best measured on test → ``evolution_vs_random_best_points``.
"""

from __future__ import annotations

import random
import time

import torch

from efficientml.analysis.record import log


def _data(st):
    from efficientml.data.fashion_mnist import load_fashion_mnist
    from efficientml.data.loader import ImageTensors, TensorLoader

    n_train = 2000 if st.args.quick else st.args.train_images
    train = load_fashion_mnist("train")
    train = train.subset(n_train, 0) if n_train < len(train) else train
    test = load_fashion_mnist("test")
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
    half = len(test) // 2 if not st.args.quick else 500

    def part(idx):
        return ImageTensors(test.images[idx], test.labels[idx], test.mean, test.std, test.classes)

    loaders = {"train": TensorLoader(train, 128, shuffle=True, augment=True, seed=0),
               "val": TensorLoader(part(perm[:half]), 500), "test": TensorLoader(part(perm[half:2 * half]), 500)}
    calib = [x for i, (x, _) in zip(range(10), TensorLoader(train, 128, shuffle=True, seed=1))]
    return loaders, calib


def run_ofa(st) -> None:
    from efficientml.nas.ofa import OFANet
    from efficientml.nas.ofa_train import ShrinkConfig, progressive_shrink

    args, R, space = st.args, st.R, st.space
    loaders, calib = _data(st)
    epochs = (0.05,) * 4 if args.quick else tuple(float(e) for e in args.epochs.split(","))
    cfg = ShrinkConfig(epochs=epochs)
    net = OFANet(space)
    t0 = time.perf_counter()
    hist = progressive_shrink(net, loaders["train"], cfg, log=log)
    R["ofa"] = {"config": cfg.to_dict(), "train_images": len(loaders["train"].data), "history": hist,
                "train_seconds": time.perf_counter() - t0}
    st.save()
    _vs_scratch(st, net, loaders, calib, sum(epochs))
    archs, acc = _predictor(st, net, loaders, calib)
    _searches(st, net, loaders, calib, archs, acc)


def _vs_scratch(st, net, loaders, calib, epochs: float) -> None:
    from efficientml.nas.ofa_train import accuracy, evaluate_subnet
    from efficientml.nas.subnet import build_subnet
    from efficientml.train.config import TrainConfig
    from efficientml.train.loop import fit

    space, rng = st.space, random.Random(7)
    n = 2 if st.args.quick else st.args.scratch_subnets
    rows = []
    for a in [space.sample(rng, resolution=28) for _ in range(n)]:
        ofa_acc, _ = evaluate_subnet(net, a, calib, loaders["test"])
        scratch = build_subnet(space, a)
        t0 = time.perf_counter()
        fit(scratch, loaders["train"], TrainConfig(epochs=epochs, lr=0.05, schedule="cosine", warmup_frac=0.05,
                                                   weight_decay=4e-5), progress=False)
        rows.append({"arch": a.key(), "ofa": ofa_acc, "scratch": accuracy(scratch, loaders["test"], a.resolution),
                     "scratch_seconds": time.perf_counter() - t0})
        log(f"subnet {a.key()}: ofa {rows[-1]['ofa']:.2f} scratch {rows[-1]['scratch']:.2f}")
        st.R["ofa"]["vs_scratch"] = rows
        st.save()
    diff = sum(r["ofa"] - r["scratch"] for r in rows) / len(rows)
    st.rec.target("ofa_subnet_vs_scratch_points", diff, ">=", -0.5,
                  note=f"mean over {len(rows)} random subnets at 28×28 of (supernet-extracted accuracy after BN "
                       f"re-calibration − the same architecture trained from scratch for {epochs:g} epochs), test half")


def _predictor(st, net, loaders, calib):
    from efficientml.nas.ofa_train import evaluate_subnet
    from efficientml.nas.predictor import AccuracyPredictor, error_vs_samples, rmse

    space, rng = st.space, random.Random(11)
    n = 12 if st.args.quick else st.args.predictor_samples
    archs = list(dict.fromkeys(space.sample(rng) for _ in range(n)))
    t0 = time.perf_counter()
    acc = [evaluate_subnet(net, a, calib, loaders["val"])[0] for a in archs]
    k = int(0.8 * len(archs))
    p = AccuracyPredictor(space).fit(archs[:k], acc[:k])
    err = rmse(p.predict(archs[k:]), acc[k:])
    sizes = [s for s in (25, 50, 100, 150, k) if s <= k]
    curve = error_vs_samples(space, archs[:k], acc[:k], archs[k:], acc[k:], sizes)
    st.R["ofa"]["predictor"] = {"samples": len(archs), "train": k, "test": len(archs) - k, "rmse_points": err,
                                "acc_range": [min(acc), max(acc)], "acc_std": float(torch.tensor(acc).std()),
                                "error_vs_samples": curve, "measure_seconds": time.perf_counter() - t0}
    st.rec.target("acc_predictor_rmse_points", err, "<=", 0.5,
                  note=f"MLP on the arch encoding, trained on {k} subnets' val accuracies, RMSE on {len(archs) - k} "
                       "held-out subnets (results.ofa.predictor.error_vs_samples: RMSE vs training samples)")
    st.save()
    st.predictor = p
    return archs, acc


def _searches(st, net, loaders, calib, archs, acc) -> None:
    from efficientml.nas.costs import subnet_cost
    from efficientml.nas.ofa_train import evaluate_subnet
    from efficientml.nas.search import Constraints, evolution_search, random_search
    from efficientml.nas.space import Arch

    space, p = st.space, st.predictor
    cons = Constraints(max_macs=subnet_cost(space, space.largest()).macs // 2)
    budget = 30 if st.args.quick else st.args.search_budget
    out = {}
    for name, fn in (("random", random_search), ("evolution", evolution_search)):
        h = fn(space, p.predict, budget, cons, seed=0)
        best = Arch.from_dict(h.best["arch"])
        test_acc, _ = evaluate_subnet(net, best, calib, loaders["test"])
        out[name] = {"best": h.best, "predicted": h.best["score"], "test_accuracy": test_acc,
                     "curve": [h.best_after(n) for n in range(10, budget + 1, 10)]}
        h.write(st.out.with_name(f"nas_search_{name}.json"))
    st.R["ofa"]["search"] = {"constraints": {"max_macs": cons.max_macs}, "budget": budget, **out}
    diff = out["evolution"]["test_accuracy"] - out["random"]["test_accuracy"]
    st.rec.target("evolution_vs_random_best_points", diff, ">=", 0, note=f"best of each search ({budget} predictor evaluations, MACs ≤ half the largest "
                                "network's) measured on the test half after BN re-calibration")
    st.save()
