"""Pruning benchmark → benchmarks/results/pruning.json (and pruning_gpu.json for 2:4 on a GPU).

    nice python benchmarks/pruning.py --full               # the committed JSON (CPU, 2 threads)
    python benchmarks/pruning.py --quick                   # minutes, JSON to a temp file (or --out)
    python benchmarks/pruning.py --full --parts resnet     # one part; merged into the existing JSON
    python benchmarks/pruning.py --merge a.json b.json     # parts run separately, into --out

Parts (all on Fashion-MNIST baselines from checkpoints/, 28×28 inputs):
- ``finegrained``: global L2 magnitude masks on every conv/linear weight of the VGG, fine-tuned with
  the masks re-applied after every step; size = nonzero parameters / all parameters.
- ``channel``: uniform channel pruning of the VGG (the smallest ratio giving ≥ 2× fewer MACs), L2
  criterion, physical surgery, fine-tune; MACs (theoretical) and CPU latency (measured, 2 threads).
- ``criteria``: accuracy before fine-tuning at 50% channel sparsity for each criterion, and the effect
  of sorting input channels by norm before pruning (keep-first channels without vs with the sort).
- ``netadapt``: NetAdapt to half the measured batch-64 latency (checked on whole-model measurements,
  side by side with the dense model), then a long fine-tune.
- ``resnet``: ResNet-20 channel-pruned to ≤ 60% MACs + fine-tune; pretrained CIFAR ResNet-56 at
  ratio 0 (max |Δ| of logits) and 0.5 (params/MACs predicted by the plan vs counted by analysis).
- ``gpu``: 2:4 semi-structured sparse linears vs dense (7B-MLP shapes) where CUDA is available.

Fine-tuning budgets are small on purpose (2 shared CPU cores): each run records exactly the epochs,
training subset, learning rate and schedule it used.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from efficientml.analysis import count_macs, count_parameters
from efficientml.analysis.record import (BenchmarkRecord, add_part_options, default_out,
                                         find_checkpoint, git_commit, log, merge_records, read_record,
                                         run_parts, selected_parts)
from efficientml.data import fashion_mnist_loaders
from efficientml.prune import PruneConfig, prune, recalibrate_bn
from efficientml.prune.report import compare
from efficientml.train import TrainConfig, evaluate, fit

SAMPLE = (1, 28, 28)
TARGETS = (("finegrained_size_ratio", "<=", 0.25), ("finegrained_acc_drop", "<=", 0.3),
           ("channel_mac_reduction", ">=", 2.0), ("channel_acc_drop", "<=", 1.0),
           ("channel_cpu_speedup_bs64", ">=", 1.5), ("resnet20_mac_ratio", "<=", 0.6),
           ("resnet20_acc_drop", "<=", 1.0), ("resnet56_ratio0_max_abs_diff", "<=", 1e-6),
           ("netadapt_latency_reduction", ">=", 2.0))

def load_baseline(kind: str, quick: bool, override: str | None = None):
    from efficientml.models import build_model
    from efficientml.train import load_checkpoint

    names = {"vgg": ["vgg_fmnist.safetensors", "vgg_fashionmnist.safetensors"],
             "resnet20": ["resnet20_fmnist.safetensors", "resnet20_fashionmnist.safetensors"]}[kind]
    path = find_checkpoint(names, override)
    if path is not None:
        from efficientml.data.paths import sha256_file

        model, meta = load_checkpoint(path)
        hist = meta.get("history") or []
        return model.eval(), {"checkpoint": str(path), "sha256": sha256_file(path)[:16],
                              "model": meta.get("model"), "model_kwargs": meta.get("model_kwargs"),
                              "epochs_trained": len(hist),
                              "epochs_planned": (meta.get("train_config") or {}).get("epochs"),
                              "checkpoint_test_accuracy": meta.get("test_accuracy")}
    if not quick:
        raise SystemExit(f"no {kind} baseline in checkpoints/ (looked for {names}); train it first")
    kw = {"vgg": {"width": 0.25, "in_channels": 1}, "resnet20": {"in_channels": 1}}[kind]
    return build_model("vgg" if kind == "vgg" else "resnet20", **kw).eval(), {"checkpoint": None, "note": "random init (quick)"}


class Env:
    """Data and the one fine-tuning recipe every part uses (so a dense control is comparable)."""

    def __init__(self, quick: bool, netadapt_step: float = 0.12, ft_images: int | None = None,
                 ft_epochs: float | None = None):
        self.quick, self.netadapt_step = quick, netadapt_step
        # Sized for 2 CPU cores shared by six engineers' jobs (this process got 5-20% of one core):
        # one fine-tuning epoch over 10k training images, accuracy on a fixed 2,000-image test subset.
        self.ft_subset = ft_images or (512 if quick else 10000)
        self.ft_epochs = ft_epochs or (0.5 if quick else 1.0)
        self.test_subset = 500 if quick else 2000
        self.train, self.test = fashion_mnist_loaders(batch_size=128, augment=True,
                                                      train_subset=self.ft_subset,
                                                      test_subset=self.test_subset)
        self.calib_loader, _ = fashion_mnist_loaders(batch_size=128, augment=False, train_subset=4096, seed=1)
        self.holdout, _ = fashion_mnist_loaders(batch_size=500, augment=False, train_subset=2000, seed=2)
        self.holdout.shuffle = False
        self.calib = [b for _, b in zip(range(4), self.calib_loader)]

    def acc(self, model: torch.nn.Module) -> float:
        """Top-1 % on the fixed test subset (the same images for every model)."""
        return evaluate(model, self.test)["accuracy"]

    def ft(self, lr: float = 0.01) -> TrainConfig:
        return TrainConfig(epochs=self.ft_epochs, lr=lr, schedule="cosine", warmup_frac=0.0, weight_decay=5e-4)

    def ft_record(self, cfg: TrainConfig) -> dict:
        return {"train_config": cfg.to_dict(), "train_images": self.ft_subset, "augment": True,
                "batch_size": 128, "steps": int(-(-self.ft_subset // 128) * cfg.epochs),
                "note": "base learning rate 0.1 lowered 10×; a subset of the 60k training images"}

    def reference(self, base: torch.nn.Module, base_acc: float) -> tuple[float, dict]:
        """The dense model fine-tuned with the same recipe: drops are measured against the better of
        it and the checkpoint, so extra training is never credited to pruning."""
        dense = copy.deepcopy(base)
        ft = self.ft()
        fit(dense, self.train, ft, progress=False)
        acc = self.acc(dense)
        return max(base_acc, acc), {"checkpoint_accuracy": base_acc, "dense_finetuned_accuracy": acc,
                                    "reference_accuracy": max(base_acc, acc), "finetune": self.ft_record(ft)}


def part_finegrained(env: Env, rec: BenchmarkRecord, base: torch.nn.Module, base_acc: float) -> None:
    sparsity = 0.77
    cfg = PruneConfig(method="fine", sparsity=sparsity, criterion="l2", scope="global")
    res = prune(base, cfg)
    acc0 = env.acc(res.model)
    ft = env.ft()
    t0 = time.perf_counter()
    fit(res.model, env.train, ft, after_step=res.after_step, progress=False)
    model = res.masks.remove()
    acc1 = env.acc(model)
    params, nonzero = count_parameters(model), count_parameters(model, nonzero_only=True)
    ratio = nonzero / params
    rec.results["finegrained"] = {
        "config": cfg.to_dict(), "dense_params": params, "nonzero_params": nonzero,
        "size_ratio_nonzero_over_dense": ratio, "layer_sparsity": res.masks.sparsity(),
        "accuracy_dense": base_acc, "accuracy_pruned_before_ft": acc0, "accuracy_after_ft": acc1,
        "finetune": env.ft_record(ft), "finetune_seconds": time.perf_counter() - t0,
        "speedup": "none claimed: dense kernels run masked weights at dense speed; see sparse.py",
    }
    from efficientml.prune.sparse import crossover, to_csr

    x64 = torch.randn(64, *SAMPLE)
    csr_model = to_csr(copy.deepcopy(model).eval(), min_sparsity=0.5)
    from efficientml.prune.report import measure_pair

    d_ms, c_ms = measure_pair(model, csr_model, x64, threads=2, rounds=3, runs=5)
    rec.results["finegrained"]["csr_execution_bs64"] = {
        "dense_ms": d_ms, "csr_ms": c_ms, "speedup": d_ms / c_ms, "kind": "measured",
        "note": "layers with ≥ 50% zeros run as CSR sparse × dense (scipy CSR kernel, convs via im2col)"}
    grid = (0.9, 0.99) if env.quick else (0.9, 0.98, 0.99)
    runs = 2 if env.quick else 3
    conv = torch.nn.Conv2d(128, 128, 3, padding=1, bias=False)
    lin = torch.nn.Linear(1024, 1024, bias=False)
    rec.results["sparse_cpu_crossover"] = {
        "conv128x128_3x3_7x7_bs64": crossover(conv, torch.randn(64, 128, 7, 7), sparsities=grid, runs=runs),
        "linear1024x1024_bs64": crossover(lin, torch.randn(64, 1024), sparsities=grid, runs=runs)}
    rec.target("finegrained_size_ratio", round(ratio, 4), "<=", 0.25,
               note="nonzero fp32 parameters / dense fp32 parameters (all parameters, BN included)")
    rec.target("finegrained_acc_drop", round(base_acc - acc1, 3), "<=", 0.3,
               note=f"test accuracy points: reference {base_acc:.2f} (best of checkpoint and dense model "
                    f"fine-tuned with the same recipe) → pruned+fine-tuned {acc1:.2f}")


def smallest_ratio(base: torch.nn.Module, want: float, example: torch.Tensor, start: float = 0.1,
                   stop: float = 0.8) -> tuple[float, float]:
    """The smallest uniform channel ratio (0.01 steps) whose plan predicts MACs_after/MACs_before ≤ want
    (the plan's MAC prediction equals analysis.count_macs of the shrunken model; tests check it)."""
    from efficientml.prune import ChannelPlan, DependencyGraph
    from efficientml.prune.amc import plan_for_ratios

    graph = DependencyGraph.build(base, example)
    dense = ChannelPlan(graph, {}).predicted_macs()
    flat = {g.id: torch.zeros(len(g)) for g in graph.groups}
    r = start
    while r < stop:
        frac = plan_for_ratios(graph, {g.id: round(r, 2) for g in graph.groups}, flat).predicted_macs() / dense
        if frac <= want:
            return round(r, 2), frac
        r += 0.01
    raise RuntimeError("no uniform ratio reaches the MAC target")


def part_channel(env: Env, rec: BenchmarkRecord, base: torch.nn.Module, base_acc: float) -> None:
    example = torch.randn(2, *SAMPLE)
    ratio, frac = smallest_ratio(base, 0.5, example)
    cfg = PruneConfig(method="channel", sparsity=ratio, criterion="l2")
    res = prune(base, cfg, example_inputs=example)
    acc0 = env.acc(res.model)
    recalibrate_bn(res.model, env.calib)
    ft = env.ft()
    t0 = time.perf_counter()
    fit(res.model, env.train, ft, progress=False)
    acc1 = env.acc(res.model)
    ft_s = time.perf_counter() - t0
    table = compare(base, res.model, SAMPLE, threads=2, rounds=3 if env.quick else 5,
                    runs=5 if env.quick else 10)
    table["before"]["accuracy"], table["after"]["accuracy"] = base_acc, acc1
    t1 = compare(base, res.model, SAMPLE, threads=1, batch_sizes=(64,), rounds=3, runs=5 if env.quick else 10)
    table["supplementary_1_thread_bs64"] = t1["ratios"]["speedup_bs64"] | {
        "before_ms": t1["before"]["latency_ms_bs64"], "after_ms": t1["after"]["latency_ms_bs64"]}
    mac_red = table["ratios"]["mac_reduction"]["value"]
    speed = table["ratios"]["speedup_bs64"]["value"]
    rec.results["channel"] = {
        "config": cfg.to_dict(), "channels": res.summary()["channels"], "table": table,
        "accuracy_pruned_before_ft": acc0, "finetune": env.ft_record(ft), "finetune_seconds": ft_s,
    }
    rec.target("channel_mac_reduction", round(mac_red, 3), ">=", 2.0,
               note=f"theoretical: MACs {table['before']['macs']:,} → {table['after']['macs']:,} (analysis.count_macs)")
    rec.target("channel_acc_drop", round(base_acc - acc1, 3), "<=", 1.0,
               note=f"test accuracy points: reference {base_acc:.2f} (best of checkpoint and dense fine-tuned "
                    f"with the same recipe) → {acc1:.2f} after fine-tuning")
    rec.target("channel_cpu_speedup_bs64", round(speed, 3), ">=", 1.5,
               note=f"measured: median latency at batch 64, 2 threads, {table['before']['latency_ms_bs64']:.2f} → "
                    f"{table['after']['latency_ms_bs64']:.2f} ms, interleaved rounds")


def part_criteria(env: Env, rec: BenchmarkRecord, base: torch.nn.Module, base_acc: float) -> None:
    example = torch.randn(2, *SAMPLE)
    rows = {}
    for name, kw in [("magnitude_l2", {"criterion": "l2"}), ("magnitude_l1", {"criterion": "l1"}),
                     ("bn_gamma", {"criterion": "bn_gamma"}), ("taylor_fisher", {"criterion": "taylor"}),
                     ("apoz", {"criterion": "apoz"}), ("thinet_refit", {"criterion": "thinet"}),
                     ("thinet_no_refit", {"criterion": "thinet", "refit": False}),
                     ("unsorted_keep_first", {"criterion": "first"}),
                     ("lab1_sorted_keep_first", {"criterion": "first", "sort_inputs": True})]:
        t0 = time.perf_counter()
        cfg = PruneConfig(method="channel", sparsity=0.5, **kw)
        res = prune(base, cfg, example_inputs=example, calib=env.calib)
        seconds = time.perf_counter() - t0
        raw = env.acc(res.model)
        recal = env.acc(recalibrate_bn(res.model, env.calib))
        rows[name] = {"accuracy_before_ft": raw, "accuracy_before_ft_bn_recalibrated": recal,
                      "seconds": seconds, "params": count_parameters(res.model), "config": cfg.to_dict()}
        log("criteria", name, raw, recal)
    rec.results["criteria"] = {"dense_accuracy": base_acc, "channel_sparsity": 0.5,
                               "calibration": "4 batches × 128 training images (no augmentation)",
                               "bn_recalibrated": "BatchNorm running statistics re-estimated on the same "
                                                  "4 calibration batches; no weight is trained",
                               "rows": rows}


def part_netadapt(env: Env, rec: BenchmarkRecord, base: torch.nn.Module, base_acc: float) -> None:
    from efficientml.prune.netadapt import NetAdaptConfig, netadapt

    # goal 0.5 × (1 − 0.05) of the measured latency: headroom for the noise of the final re-measurement
    cfg = NetAdaptConfig(target_ratio=0.5, margin=0.05, initial_step=env.netadapt_step, step_decay=0.95,
                         batch_size=64, threads=2, grid=3 if env.quick else 4, short_steps=2 if env.quick else 20,
                         eval_batches=1 if env.quick else 2, runs=3 if env.quick else 5, rounds=1 if env.quick else 3,
                         probes=1 if env.quick else 3, channel_multiple=8, max_iterations=3 if env.quick else 15)
    t0 = time.perf_counter()
    res = netadapt(base, cfg, SAMPLE, env.train, env.holdout, log=lambda i: log("netadapt", i))
    search_s = time.perf_counter() - t0
    acc_search = env.acc(res.model)
    ft = env.ft()
    t0 = time.perf_counter()
    fit(res.model, env.train, ft, progress=False)
    ft_s = time.perf_counter() - t0
    acc1 = env.acc(res.model)
    table = compare(base, res.model, SAMPLE, threads=2, batch_sizes=(1, 64), rounds=3 if env.quick else 5,
                    runs=5 if env.quick else 10)
    reduction = table["ratios"]["speedup_bs64"]["value"]
    rec.results["netadapt"] = {
        "config": cfg.to_dict(), "iterations": res.iterations, "search_seconds": search_s,
        "initial_latency_ms": res.initial_latency_ms, "final_latency_ms_in_search": res.final_latency_ms,
        "lookup_table": res.table, "accuracy_after_search": acc_search, "accuracy_after_long_ft": acc1,
        "dense_accuracy": base_acc, "long_finetune": env.ft_record(ft), "long_finetune_seconds": ft_s,
        "final_comparison": table,
        "method": "per-layer table (batch 64, 2 threads) proposes each group's channel count as a share of "
                  "the latency (kept counts multiples of 8); every candidate's whole-model latency is measured side by side with the "
                  "current model and channels are added until the measured drop meets the request; the "
                  "kept model is timed against the original at every iteration and the loop stops on that "
                  "measured ratio",
    }
    rec.target("netadapt_latency_reduction", round(reduction, 3), ">=", 2.0,
               note="measured: dense / NetAdapt median latency at batch 64, 2 threads, "
                    f"{table['before']['latency_ms_bs64']:.2f} → {table['after']['latency_ms_bs64']:.2f} ms, "
                    "interleaved rounds after the search and long fine-tune; test accuracy "
                    f"{base_acc:.2f} (checkpoint) → {acc1:.2f}")


def part_resnet(env: Env, rec: BenchmarkRecord, checkpoint: str | None = None) -> None:
    from efficientml.data.cifar_samples import load_cifar_samples
    from efficientml.models import build_model
    from efficientml.models.resnet_cifar import PRETRAINED_MEAN, PRETRAINED_STD

    # ResNet-20 on Fashion-MNIST
    base, meta = load_baseline("resnet20", env.quick, checkpoint)
    ckpt_acc = env.acc(base)
    base_acc, ref_info = env.reference(base, ckpt_acc)
    meta = {**meta, "reference": ref_info}
    log("resnet20 reference", ref_info)
    example = torch.randn(2, *SAMPLE)
    ratio, frac = smallest_ratio(base, 0.6, example, start=0.1)
    cfg = PruneConfig(method="channel", sparsity=ratio, criterion="l2")
    res = prune(base, cfg, example_inputs=example)
    acc0 = env.acc(res.model)
    recalibrate_bn(res.model, env.calib)
    ft = env.ft()
    fit(res.model, env.train, ft, progress=False)
    acc1 = env.acc(res.model)
    macs0, macs1 = count_macs(base, (1, *SAMPLE)).macs, count_macs(res.model, (1, *SAMPLE)).macs
    rec.results["resnet20"] = {"baseline": meta, "config": cfg.to_dict(), "channels": res.summary()["channels"],
                               "macs_before": macs0, "macs_after": macs1, "params_before": count_parameters(base),
                               "params_after": count_parameters(res.model), "accuracy_dense": base_acc,
                               "accuracy_pruned_before_ft": acc0, "accuracy_after_ft": acc1,
                               "finetune": env.ft_record(ft)}
    rec.target("resnet20_mac_ratio", round(macs1 / macs0, 4), "<=", 0.6,
               note=f"theoretical: MACs {macs0:,} → {macs1:,}; residual streams pruned per stage, option-A pads in pairs")
    rec.target("resnet20_acc_drop", round(base_acc - acc1, 3), "<=", 1.0,
               note=f"test accuracy points: reference {base_acc:.2f} (best of checkpoint and dense fine-tuned "
                    f"with the same recipe) → {acc1:.2f}")

    # pretrained CIFAR ResNet-56
    r56 = build_model("resnet56", pretrained=True).eval()
    x, labels = load_cifar_samples(normalize=True, mean=PRETRAINED_MEAN, std=PRETRAINED_STD)
    with torch.no_grad():
        ref = r56(x)
        same = prune(r56, PruneConfig(method="channel", sparsity=0.0), example_inputs=x[:2]).model
        diff0 = (same(x) - ref).abs().max().item()
        half = prune(r56, PruneConfig(method="channel", sparsity=0.5), example_inputs=x[:1])
        out = half.model.eval()(x)
    counted_p, counted_m = count_parameters(half.model), count_macs(half.model, (1, 3, 32, 32)).macs
    pred_p, pred_m = half.plan.predicted_params(r56), half.plan.predicted_macs()
    rec.results["resnet56"] = {
        "inputs": "the 20 CIFAR-10 test samples in shared/data, normalized as the pretrained weights expect",
        "ratio0_max_abs_diff": diff0, "sample_accuracy_dense": float((ref.argmax(1) == labels).float().mean() * 100),
        "ratio05": {"runs": bool(torch.isfinite(out).all()), "output_shape": list(out.shape),
                    "params_predicted_by_plan": pred_p, "params_counted_by_analysis": counted_p,
                    "macs_predicted_by_plan": pred_m, "macs_counted_by_analysis": counted_m,
                    "params_dense": count_parameters(r56), "macs_dense": count_macs(r56, (1, 3, 32, 32)).macs,
                    "match": pred_p == counted_p and pred_m == counted_m},
    }
    rec.target("resnet56_ratio0_max_abs_diff", diff0, "<=", 1e-6,
               note="max |logits(original) − logits(pruned at ratio 0)| on 20 CIFAR-10 samples")


def part_gpu(quick: bool, out: Path) -> None:
    from efficientml.prune.sparse import semi_structured_available, sparse24_benchmark

    rec = BenchmarkRecord("pruning_gpu", device="cuda" if torch.cuda.is_available() else "cpu")
    ok, why = semi_structured_available()
    if not ok:
        rec.results["sparse24"] = {"available": False, "reason": why}
        rec.target("sparse24_speedup_4096tok_11008x4096", None, ">=", 1.0,
                   note=f"not measured: {why}; the code path is efficientml.prune.sparse.sparse24_benchmark")
    else:
        res = sparse24_benchmark(tokens=(1, 16, 256, 4096), quick=quick)
        rec.results["sparse24"] = res
        v = res["layers"]["11008x4096"]["4096"]["speedup"]
        rec.target("sparse24_speedup_4096tok_11008x4096", round(v, 3), ">=", 1.0,
                   note="measured: dense fp16 / 2:4 fp16 median latency, nn.Linear(11008→4096) "
                        "(weight 4096×11008) at 4096 tokens" + ("" if v >= 1 else "; slower than dense"))
    log("wrote", rec.write(out))


def merge(sources: list[str], out: Path) -> int:
    """Fold separately run parts into ``out`` (each part keeps its own commit in results.runs); a
    target whose part never ran is recorded as not measured."""
    docs = ([read_record(out)] if out.is_file() else []) + [read_record(s) for s in sources]
    rec = merge_records(docs, "pruning")
    have = {t["id"] for t in rec.targets}
    for tid, op, thr in TARGETS:
        if tid not in have:
            rec.target(tid, None, op, thr, note="not measured: its part did not finish within this session's "
                                                 "share of the shared 2-core CPU; rerun with --part")
    rec.write(out)
    log("merged", sources, "into", out)
    return 0


class Run:
    """What the parts share: options, the record, the data/fine-tuning recipe and the VGG baseline
    (loaded on the first VGG part; its fine-tuned dense reference too when a part needs one)."""

    def __init__(self, args: argparse.Namespace, parts: list[str], rec: BenchmarkRecord, out: Path):
        self.args, self.parts, self.rec, self.out = args, parts, rec, out
        self.env: Env | None = None
        self.base: torch.nn.Module | None = None
        self.base_acc = self.ref_acc = 0.0

    def vgg(self) -> tuple[Env, torch.nn.Module]:
        if self.base is None:
            env = self.env
            self.base, meta = load_baseline("vgg", self.args.quick, self.args.vgg_checkpoint)
            self.base_acc = self.ref_acc = env.acc(self.base)
            self.rec.results["vgg_baseline"] = {**meta, "test_accuracy": self.base_acc,
                                                "macs": count_macs(self.base, (1, *SAMPLE)).macs,
                                                "params": count_parameters(self.base)}
            log("vgg baseline", self.base_acc)
            if any(p in self.parts for p in ("finegrained", "channel")):
                self.ref_acc, info = env.reference(self.base, self.base_acc)
                self.rec.results["vgg_reference"] = info
                log("vgg reference", info)
        return self.env, self.base


def _vgg_part(fn, reference: bool = True):
    """A VGG part: drops are measured against the fine-tuned dense reference, except for the
    criteria table (accuracy before fine-tuning, against the checkpoint)."""
    def part(run: Run) -> None:
        env, base = run.vgg()
        fn(env, run.rec, base, run.ref_acc if reference else run.base_acc)
        log(fn.__name__.removeprefix("part_"), "done", run.rec.targets[-3:])
    return part


# the parts in the order they run (the VGG parts share one seeded random stream: keep the order)
PARTS = {
    "gpu": lambda run: part_gpu(run.args.quick, default_out("pruning_gpu", run.args.quick)),
    "finegrained": _vgg_part(part_finegrained),
    "channel": _vgg_part(part_channel),
    "netadapt": _vgg_part(part_netadapt),
    "criteria": _vgg_part(part_criteria, reference=False),
    "resnet": lambda run: part_resnet(run.env, run.rec, run.args.resnet_checkpoint),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny budgets, for tests and CI (JSON to a temp file)")
    mode.add_argument("--full", action="store_true", help="the budgets of the committed JSON")
    add_part_options(ap, PARTS, quick=False)
    ap.add_argument("--part", action="append", choices=list(PARTS), help="run only these parts (repeatable)")
    ap.add_argument("--vgg-checkpoint", default=None, help="VGG baseline (default checkpoints/vgg_f*mnist)")
    ap.add_argument("--resnet-checkpoint", default=None, help="ResNet-20 baseline (default checkpoints/resnet20_f*mnist)")
    ap.add_argument("--ft-images", type=int, default=None,
                    help="training images used for every fine-tune (default 10,000; 60000 = all)")
    ap.add_argument("--ft-epochs", type=float, default=None, help="fine-tuning epochs (default 1)")
    ap.add_argument("--netadapt-step", type=float, default=0.12,
                    help="NetAdapt's first per-iteration latency drop, as a fraction of the initial latency")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, default_out("pruning", False, args.out))
    parts = selected_parts(PARTS, args.parts, args.part)
    # 1 intra-op thread for pruning, training and evaluation: on the shared 2-core machine two threads
    # spin-wait against other processes and run several times slower. Latency is always measured
    # with threads=2 (analysis.measure_latency sets it for the measurement only).
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if parts == ["gpu"]:
        PARTS["gpu"](Run(args, parts, BenchmarkRecord("pruning_gpu"), Path()))
        return 0
    out = default_out("pruning", args.quick, args.out)
    rec = BenchmarkRecord("pruning")
    if out.is_file() and (args.part or args.parts):  # merge into the previous run's other parts
        old = read_record(out)
        rec.results, rec.targets = old.get("results", {}), old.get("targets", [])
        rec.command = old.get("command", rec.command) + " ; " + rec.command
    cpu_parts = [p for p in parts if p != "gpu"]
    rec.results.setdefault("runs", []).append({"parts": cpu_parts, "git_commit": git_commit(),
                                               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    run = Run(args, cpu_parts, rec, out)
    if "gpu" in parts:  # first, before the CPU parts' data and seeded random stream
        PARTS["gpu"](run)
    run.env = env = Env(args.quick, args.netadapt_step, args.ft_images, args.ft_epochs)
    protocol = {
        "test_images": env.test_subset, "finetune_images": env.ft_subset, "finetune_epochs": env.ft_epochs,
        "torch_threads_for_training_and_eval": 1, "latency_threads": 2,
        "why": "2 CPU cores shared with five other engineers' training jobs; budgets sized to finish"}
    rec.results.setdefault("protocol", protocol)
    for p in cpu_parts:  # parts rerun with another budget say so
        rec.results.setdefault("protocol_by_part", {})[p] = protocol

    def done(name: str, seconds: float) -> None:
        rec.results.setdefault("seconds", {})[name] = seconds
        rec.write(out)

    run_parts(PARTS, cpu_parts, run, after=done)
    rec.write(out)
    log("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
