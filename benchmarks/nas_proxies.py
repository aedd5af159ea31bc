"""The ``proxies`` part of benchmarks/nas.py: zero-shot proxies against trained accuracy.

``--proxy-archs`` distinct random architectures of the space (seed 3), each scored at initialization by
every proxy of efficientml.nas.proxies on one batch of 64 real Fashion-MNIST training images, then
trained from scratch (``--proxy-epochs`` on ``--proxy-train-images`` images, SGD, cosine) and measured on
the test split. Spearman and Kendall rank correlations of each proxy with the trained accuracy, next
to the parameter count's → ``best_proxy_spearman`` (reported beside ``params_spearman``).
"""

from __future__ import annotations

import random
import time

import torch

from efficientml.analysis.record import log


def run_proxies(st) -> None:
    from efficientml.data.fashion_mnist import fashion_mnist_loaders
    from efficientml.nas.ofa_train import accuracy
    from efficientml.nas.proxies import PROXIES, score
    from efficientml.nas.rank import kendall_tau, spearman
    from efficientml.nas.subnet import build_subnet
    from efficientml.train.config import TrainConfig
    from efficientml.train.loop import fit

    args, space = st.args, st.space
    n = 4 if args.quick else args.proxy_archs
    train, test = fashion_mnist_loaders(batch_size=128, augment=True,
                                        train_subset=1000 if args.quick else args.proxy_train_images,
                                        test_subset=500 if args.quick else None)
    x, y = next(iter(train))
    x, y = x[:64], y[:64]
    rng = random.Random(3)
    archs = list(dict.fromkeys(space.sample(rng, resolution=28) for _ in range(n)))
    rows = []
    for i, a in enumerate(archs):
        torch.manual_seed(i)
        net = build_subnet(space, a)
        t0 = time.perf_counter()
        scores = {name: score(net, name, x, y, seed=0) for name in PROXIES}
        proxy_s = time.perf_counter() - t0
        fit(net, train, TrainConfig(epochs=0.05 if args.quick else args.proxy_epochs, lr=0.05, schedule="cosine",
                                    warmup_frac=0.05, weight_decay=4e-5, seed=i), progress=False)
        rows.append({"arch": a.key(), "accuracy": accuracy(net, test, 28), "proxies": scores,
                     "proxy_seconds": proxy_s, "train_seconds": time.perf_counter() - t0 - proxy_s})
        log(f"proxies {i + 1}/{len(archs)} {a.key()}: {rows[-1]['accuracy']:.2f}%")
        st.R["proxies"] = {"rows": rows}
        st.save()
    acc = [r["accuracy"] for r in rows]
    corr = {name: {"spearman": spearman([r["proxies"][name] for r in rows], acc),
                   "kendall": kendall_tau([r["proxies"][name] for r in rows], acc)} for name in PROXIES}
    best = max((k for k in corr if k != "params"), key=lambda k: corr[k]["spearman"])
    st.R["proxies"].update({"correlation": corr, "best_proxy": best, "archs": len(rows),
                            "beats_params": corr[best]["spearman"] > corr["params"]["spearman"],
                            "protocol": {"train_images": len(train.data), "epochs": args.proxy_epochs,
                                         "proxy_batch": 64, "test_images": len(test.data)}})
    note = (f"{len(rows)} architectures trained {args.proxy_epochs:g} epochs; best proxy {best} "
            f"(Spearman {corr[best]['spearman']:.3f}) vs parameter count {corr['params']['spearman']:.3f}: "
            + ("the proxy beats counting parameters" if st.R["proxies"]["beats_params"]
               else "no proxy beats counting parameters"))
    st.rec.target("best_proxy_spearman", corr[best]["spearman"], ">=", corr["params"]["spearman"], note=note)
    st.rec.target("params_spearman", corr["params"]["spearman"], ">=", -1.0, note="reported beside the proxies")
    st.save()
