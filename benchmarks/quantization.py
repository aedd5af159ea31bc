"""Quantization benchmark (issue 4) → benchmarks/results/quantization.json.

On the Fashion-MNIST course VGG (width 0.25, 28×28) and the pretrained CIFAR ResNet-20:
k-means at 8/4/2 bits (+ centroid fine-tuning), integer-only int8 per calibrator (+ int4 weights),
int8 CPU latency vs fp32 and torch.ao, Deep Compression to a real file, RTN vs AdaRound, TWN/TTQ/
BWN/XNOR after QAT, LSQ QAT with export, mixed precision with a Pareto plot, ResNet-20 int8.

The CPU is shared, so the cheap fine-tuning runs use a fraction of an epoch (recorded per run in the
JSON as ``train_images``). Deep Compression prunes iteratively (three steps towards the final
sparsity, masks kept during every fine-tuning step, distilled from the dense model) and fine-tunes
the centroids after k-means; its file stores BN, biases and codebooks as float16;
TWN gets one epoch of QAT, TTQ 1.5, BWN/XNOR half an epoch. Training and evaluation use ``--threads``; latency
uses the stated threads.

    flock /tmp/efficientml-cpu.lock python benchmarks/quantization.py            # full, writes the JSON
    python benchmarks/quantization.py --quick         # seconds-to-minutes smoke run, no JSON

Sections can be run one at a time under the lock (``--only deep_compression``, saved to ``--partial``)
and assembled with ``--resume``; the JSON lists the sections taken from the partial file.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from efficientml.analysis.latency import measure_latency
from efficientml.analysis.record import (REPO_ROOT as ROOT, BenchmarkRecord, add_part_options,
                                         find_checkpoint, log, run_parts, selected_parts)
from efficientml.core.serialization import save_state_dict
from efficientml.data import fashion_mnist_loaders
from efficientml.distill import TeacherLoss
from efficientml.quant import (AdaRoundConfig, BinaryConfig, DeepCompressionConfig, IntegerConfig,
                               KMeansConfig, QATConfig, adaround, export_qat, kmeans_quantize,
                               load_compressed, magnitude_prune, prepare_qat, quantize, round_to_float16,
                               save_compressed, strip_kmeans)
from efficientml.quant.deep_compression import apply_masks
from efficientml.quant.kmeans import kmeans_codebooks
from efficientml.quant.mixed import (apply_bits, layer_sensitivity, layer_sizes, pareto_front,
                                     plot_pareto, search_bits, weight_bytes)
from efficientml.quant.rounding import round_weights
from efficientml.quant.torch_ref import torch_ao_int8
from efficientml.train import TrainConfig, evaluate, fit, load_checkpoint

warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
warnings.filterwarnings("ignore", category=UserWarning, module="torch.ao")

OBSERVER_NAMES = ("minmax", "ema", "percentile", "mse", "kl")


def acc(model: nn.Module, loader) -> float:
    return round(evaluate(model, loader)["accuracy"], 2)


def finetune(model: nn.Module, loader, epochs: float, lr: float, optimizer: str = "sgd", after_step=None,
             weight_decay: float = 0.0, teacher: nn.Module | None = None, kd_temperature: float = 4.0) -> dict:
    """Fine-tune in place; with ``teacher``, the loss is CE + T²·KL to the teacher's logits (same batch)."""
    cfg = TrainConfig(epochs=epochs, lr=lr, optimizer=optimizer, momentum=0.9, weight_decay=weight_decay,
                      schedule="cosine", warmup_frac=0.0, seed=0)
    t0 = time.perf_counter()
    kd = TeacherLoss(teacher, model, temperature=kd_temperature) if teacher is not None else None
    try:
        hist = fit(model, loader, cfg, after_step=after_step, extra_loss=kd, progress=False)
    finally:
        if kd is not None:
            kd.close()
    out = {"epochs": epochs, "steps": hist.steps, "train_images": hist.steps * loader.batch_size,
           "lr": lr, "optimizer": optimizer, "schedule": "cosine", "seconds": round(time.perf_counter() - t0, 1)}
    if kd is not None:
        out["distillation"] = f"CE + T^2*KL(T={kd_temperature}) to the dense fp32 model's logits"
    return out


VGG_CHECKPOINTS = ["vgg_fmnist.safetensors", "vgg_fashionmnist.safetensors"]


# ------------------------------------------------------------------------------------------------
def bench_kmeans(base, train, test, fp32, q) -> dict:
    out = {}
    for bits, ft in ((8, 0.0), (4, q["km4_epochs"]), (2, q["km2_epochs"])):
        m = copy.deepcopy(base)
        kmeans_quantize(m, KMeansConfig(bits=bits))
        row = {"bits": bits, "accuracy_before_finetune": acc(m, test)}
        if ft > 0:
            # centroid gradients are sums over whole clusters (thousands of weights): Adam's per-parameter
            # normalization keeps the step size sane where plain SGD would blow the centroids up
            row["finetune"] = finetune(m, train, ft, lr=2e-4, optimizer="adamw")
        row["accuracy"] = acc(m, test)
        row["drop"] = round(fp32 - row["accuracy"], 2)
        books = kmeans_codebooks(m)
        row["storage_bits"] = sum(cb.storage_bits() for cb in books.values())
        row["fp32_weight_bits"] = 32 * sum(cb.labels.numel() for cb in books.values())
        out[f"kmeans{bits}"] = row
        log("kmeans", bits, row)
    return out


def bench_int8(base, calib, val, test, fp32, q) -> tuple[dict, dict]:
    table, models = {}, {}
    for wbits in (8, 4):
        for obs in OBSERVER_NAMES:
            cfg = IntegerConfig(weight_bits=wbits, observer=obs, calibration_batches=len(calib))
            im = quantize(base, cfg, calibration=calib).model
            fast = im.with_mode("fast")
            row = {"observer": obs, "weight_bits": wbits, "accuracy": acc(fast, test)}
            if wbits == 8:
                row["val_accuracy"] = acc(fast, val)
            table[f"w{wbits}a8_{obs}"] = row
            models[(wbits, obs)] = im
            log("int", wbits, obs, row)
    best = max(OBSERVER_NAMES, key=lambda o: table[f"w8a8_{o}"]["val_accuracy"])
    im = models[(8, best)]
    x = next(iter(test))[0][:256]
    ref, fast_codes = im.integer_output(x, "integer"), im.integer_output(x, "fast")
    emu = im.integer_output(x, "emulate")
    int8 = {"best_observer": best, "best_selected_on": "1000 held-out training images (val_accuracy)",
            "accuracy": table[f"w8a8_{best}"]["accuracy"],
            "accuracy_integer_reference_path": acc(im.with_mode("integer"), q["ref_test"]),
            "accuracy_fast_path_same_subset": acc(im.with_mode("fast"), q["ref_test"]),
            "reference_subset_images": len(q["ref_test"].data),
            "drop": round(fp32 - table[f"w8a8_{best}"]["accuracy"], 2),
            "integer_vs_fast_max_lsb": int((ref - fast_codes).abs().max()),
            "integer_vs_fast_identical_fraction": float((ref == fast_codes).float().mean()),
            "integer_vs_emulation_end_to_end_max_lsb": int((ref - emu).abs().max()),
            "integer_vs_emulation_per_layer_max_lsb": im.layer_lsb_differences(x[:64]),
            "weight_bytes_int8": im.size_bytes(), "report": im.report(),
            "path": "real: accuracy from PyTorch int8 kernels (quantized::conv2d/linear, x86 engine) on "
                    "our integer weights, scales and zero points"}
    return {"calibrators": table, "int8": int8}, {"best": im}


def bench_speed(base, im, calib, threads: int, rounds: int, runs: int) -> dict:
    x = torch.randn(64, *next(iter(calib))[0].shape[1:]) if isinstance(next(iter(calib)), (tuple, list)) \
        else torch.randn(64, *calib[0].shape[1:])
    ao = torch_ao_int8(base, calib, x[:1])
    fast = im.with_mode("fast")
    cands = {"fp32": base.eval(), "ours_int8": fast, "torch_ao_int8": ao}
    with torch.inference_mode():
        ours_codes = fast(x)
        ao_out = ao(x)
    per: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(rounds):                 # interleaved rounds: load changes hit all three alike
        for k, f in cands.items():
            per[k].append(measure_latency(f, x, warmup=2, runs=runs, threads=threads).median_ms)
    med = {k: statistics.median(v) for k, v in per.items()}
    return {"batch": 64, "threads": threads, "rounds": rounds, "runs_per_round": runs,
            "median_ms": med, "per_round_median_ms": per,
            "speedup_vs_fp32": med["fp32"] / med["ours_int8"],
            "torch_ao_over_ours": med["torch_ao_int8"] / med["ours_int8"],
            "torch_ao_config": "prepare_fx/convert_fx, get_default_qconfig_mapping('x86'), same calibration "
                               "batches; x.mean(dim=(2,3)) rewritten as adaptive_avg_pool2d+flatten because "
                               "torch's quantized mean fails on this model",
            "outputs_max_abs_diff_ours_vs_torch_ao": float((ours_codes - ao_out).abs().max())}


def bench_deep_compression(base, train, test, fp32, q, tmp: Path) -> dict:
    m = copy.deepcopy(base)
    dev = next(base.parameters()).device
    cfg = DeepCompressionConfig(default_sparsity=q["dc_sparsity"], sparsity=q["dc_layer_sparsity"],
                                conv_bits=q["dc_bits"], linear_bits=q["dc_bits"])
    res = {"config": cfg.to_dict(), "layer_bits_override": q["dc_layer_bits"], "float_dtype": q["dc_float_dtype"],
           "prune_steps": []}
    teacher = copy.deepcopy(base).eval() if q["dc_distill"] else None
    # iterative pruning (Han et al.): each step zeroes a larger share of the smallest weights (the zeros of
    # the previous step stay among them), then fine-tunes with the masks re-applied after every step
    for frac, epochs in zip(q["dc_prune_fracs"], q["dc_prune_epochs"]):
        step_cfg = DeepCompressionConfig(default_sparsity=frac * cfg.default_sparsity,
                                         sparsity={k: frac * v for k, v in cfg.sparsity.items()})
        masks = magnitude_prune(m, step_cfg)
        step = {"fraction_of_final_sparsity": frac, "accuracy_no_finetune": acc(m, test)}
        step["finetune"] = finetune(m, train, epochs, lr=q["dc_lr"], teacher=teacher,
                                    after_step=lambda mm, masks=masks: apply_masks(mm, masks))
        step["accuracy"] = acc(m, test)
        res["prune_steps"].append(step)
        log("deep compression prune step", step)
    res["accuracy_pruned"] = res["prune_steps"][-1]["accuracy"]
    bits = {n: q["dc_layer_bits"].get(n, cfg.conv_bits if isinstance(layer, nn.Conv2d) else cfg.linear_bits)
            for n, layer in m.named_modules() if isinstance(layer, (nn.Conv2d, nn.Linear))}
    kmeans_quantize(m.cpu(), KMeansConfig(bits=cfg.conv_bits, layer_bits=bits, prune_aware=True))
    m.to(dev)
    res["accuracy_pruned_kmeans_no_finetune"] = acc(m, test)
    # centroid fine-tuning: each centroid gets the summed gradient of its cluster; pruned weights stay 0
    res["kmeans_finetune"] = finetune(m, train, q["dc_kmeans_epochs"], lr=2e-4, optimizer="adamw", teacher=teacher)
    res["accuracy_kmeans_finetuned"] = acc(m, test)
    m.cpu()
    if q["dc_float_dtype"] == "float16":
        round_to_float16(m)        # codebooks, BN and biases are stored as float16: measure the rounded model
    books = kmeans_codebooks(m)
    strip_kmeans(m)
    res["accuracy_before_save"] = acc(m, test)
    fp32_file, dc_file = tmp / "vgg_fp32.safetensors", tmp / "vgg.emdc"
    save_state_dict(fp32_file, {k: v.cpu() for k, v in base.state_dict().items()})
    breakdown = save_compressed(dc_file, m.state_dict(), books, float_dtype=q["dc_float_dtype"])
    loaded = copy.deepcopy(base).cpu()
    state = load_compressed(dc_file)
    loaded.load_state_dict(state)
    res["identical_weights_after_load"] = all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    res["accuracy_after_load"] = acc(loaded, test)
    res["fp32_state_dict_bytes"] = fp32_file.stat().st_size
    res["compressed_bytes"] = dc_file.stat().st_size
    res["size_breakdown_bytes"] = breakdown
    res["ratio"] = res["fp32_state_dict_bytes"] / res["compressed_bytes"]
    res["nonzero_weights"] = int(sum(int((cb.labels >= 0).sum()) for cb in books.values()))
    res["total_weights"] = int(sum(cb.labels.numel() for cb in books.values()))
    res["drop"] = round(fp32 - res["accuracy_after_load"], 2)
    log("deep compression", {k: v for k, v in res.items() if k != "config"})
    return res


def bench_rounding(base, calib, test, fp32, q) -> dict:
    out = {}
    batches = [b[0] for b in calib][:4]
    for bits in (4, 3):
        rtn = copy.deepcopy(base)
        round_weights(rtn, bits)
        ada = copy.deepcopy(base)
        t0 = time.perf_counter()
        adaround(ada, batches, AdaRoundConfig(bits=bits, iters=q["ada_iters"]))
        out[f"w{bits}"] = {"rtn_accuracy": acc(rtn, test), "adaround_accuracy": acc(ada, test),
                           "adaround_seconds": round(time.perf_counter() - t0, 1),
                           "adaround_iters_per_layer": q["ada_iters"], "calibration_images": sum(len(b) for b in batches),
                           "activations": "float (weight-only)", "weights": "symmetric per-channel"}
        log("rounding", bits, out[f"w{bits}"])
    return out


def bench_binary(base, train, test, fp32, q) -> dict:
    out = {}
    for mode, ep in (("twn", q["tern_epochs"]), ("ttq", q["ttq_epochs"]), ("bwn", q["bin_epochs"]),
                     ("xnor", q["bin_epochs"])):
        m = quantize(base, BinaryConfig(mode=mode)).model
        row = {"accuracy_before_qat": acc(m, test)}
        if mode == "xnor":
            row["removed_activations"] = [n for n, mod in m.named_modules() if isinstance(mod, nn.Identity)]
        row["qat"] = finetune(m, train, ep, lr=1e-3, optimizer="adamw")
        row["accuracy"] = acc(m, test)
        row["drop"] = round(fp32 - row["accuracy"], 2)
        row["full_precision_layers"] = "first conv and classifier (as in the papers)"
        if mode == "xnor":
            row["activations"] = ("sign of the BN output (BN → sign → binary conv, as in XNOR-Net); the ReLUs in "
                                  "front of binary layers are removed, β = mean|x| per sample")
        out[mode] = row
        log("binary", mode, row)
    return out


def bench_qat(base, train, test, fp32, q) -> dict:
    m = prepare_qat(base, QATConfig(weight_bits=4, activation_bits=8, lsq=True, fold_bn=True))
    before = acc(m, test)
    ft = finetune(m, train, q["qat_epochs"], lr=1e-3, optimizer="adamw")
    after = acc(m, test)
    exp = export_qat(m)
    sd = exp.state_dict()
    return {"config": "w4 (LSQ, per channel) a8, BN folded during QAT", "accuracy_before": before, "finetune": ft,
            "accuracy_after": after, "accuracy_exported": acc(exp, test),
            "exported_float_weight_tensors": sum(1 for k, v in sd.items() if k.endswith("weight") and v.is_floating_point()),
            "exported_int8_weight_tensors": sum(1 for v in sd.values() if v.dtype == torch.int8)}


def bench_mixed(base, calib, test_small, fp32_small, tmp_plot: Path) -> dict:
    batch = torch.cat([b[0] for b in calib][:4])
    sens = layer_sensitivity(base, batch, (2, 3, 4, 6, 8))
    sizes = layer_sizes(base)
    int8 = weight_bytes(sizes, {n: 8 for n in sizes})
    points = []
    for b in (2, 3, 4, 8):
        bits = {n: b for n in sizes}
        points.append({"label": f"uniform {b}-bit", "size_bytes": weight_bytes(sizes, bits),
                       "accuracy": acc(apply_bits(base, bits), test_small), "bits": bits})
    for frac in (0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.75):
        bits = search_bits(sens, sizes, frac * int8)
        points.append({"label": f"mixed ≤{frac:.2f}×int8", "size_bytes": weight_bytes(sizes, bits),
                       "accuracy": acc(apply_bits(base, bits), test_small), "bits": bits})
    plot = None
    try:
        plot = str(plot_pareto(points, tmp_plot).relative_to(ROOT))
    except Exception as e:  # noqa: BLE001 - the plot is optional (matplotlib extra)
        plot = f"not written: {e}"
    return {"sensitivity_sqnr_db": sens, "fp32_accuracy_subset": fp32_small, "points": points,
            "pareto_front": [p["label"] for p in pareto_front(points)], "plot": plot,
            "budget": "weight bytes (sum of numel·bits/8)", "test_images": len(test_small.data)}


def bench_resnet20() -> dict:
    from efficientml.data.cifar_samples import load_cifar_samples
    from efficientml.models import build_model
    from efficientml.models.resnet_cifar import PRETRAINED_MEAN, PRETRAINED_STD

    model = build_model("resnet20", pretrained=True).eval()
    x, y = load_cifar_samples(normalize=True, mean=PRETRAINED_MEAN, std=PRETRAINED_STD)
    with torch.no_grad():
        ref = model(x)
    rows = {}
    for obs in OBSERVER_NAMES:
        for rr in (True, False):
            im = quantize(model, IntegerConfig(observer=obs, reduce_range=rr, calibration_batches=1),
                          calibration=[x]).model
            with torch.no_grad():
                out = im(x)
            noise = (ref - out).pow(2).sum()
            # reduce_range=True gives up a bit of the weights (|w| <= 63), not of the activations
            rows[f"{obs}_{'w7' if rr else 'a8'}"] = {
                "agreement": int((out.argmax(1) == ref.argmax(1)).sum()),
                "sqnr_db": float(10 * torch.log10(ref.pow(2).sum() / noise)),
                "labels_correct": int((out.argmax(1) == y).sum())}
    return {"fp32_labels_correct": int((ref.argmax(1) == y).sum()), "samples": len(y), "runs": rows,
            "path": "integer reference (int32 accumulation, fixed-point requantization)",
            "calibration": "the 20 CIFAR-10 samples themselves (as the issue specifies)"}


# ------------------------------------------------------------------------------------------------
def schedule(quick: bool) -> dict:
    """Fine-tuning epochs, iteration counts and Deep Compression settings (``q`` in the sections)."""
    # fractions of an epoch sized for a 2-core CPU shared by six engineers (see the module docstring)
    # Deep Compression sparsity per layer: conv6/conv7 see 3×3 maps and hold half of all weights, so they
    # are pruned hardest; the 28→7-pixel layers conv1–conv4 keep more (one-shot pruning + 0.12 epoch of
    # fine-tuning: 93.2 % with this split vs 92.05 % with 92 % everywhere). BN, biases and codebooks are
    # stored as float16 (11.1 → 5.6 KB) and conv6/conv7 get 4-bit codebooks; the bytes saved buy conv6/
    # conv7 93 % instead of 97 % sparsity (59.3k instead of 47.5k nonzeros at about the same file size:
    # 97 % collapsed the accuracy at the last pruning step, 94.65 → 93.8 after 3 epochs). The masked and
    # centroid fine-tuning distill from the dense model (CE + T²·KL, T = 4).
    q = dict(km4_epochs=0.1, km2_epochs=0.3, dc_prune_fracs=[0.6, 0.85, 1.0], dc_prune_epochs=[0.5, 0.5, 3.0],
             dc_lr=0.01, dc_kmeans_epochs=0.5, dc_bits=5, dc_sparsity=0.9,
             dc_layer_sparsity={"backbone.conv0": 0.4, "backbone.conv1": 0.5, "backbone.conv2": 0.7,
                                "backbone.conv3": 0.8, "backbone.conv4": 0.85, "backbone.conv5": 0.92,
                                "backbone.conv6": 0.93, "backbone.conv7": 0.93, "classifier": 0.6},
             dc_layer_bits={"backbone.conv6": 4, "backbone.conv7": 4}, dc_float_dtype="float16", dc_distill=True,
             tern_epochs=1.0, ttq_epochs=1.5, bin_epochs=0.5, qat_epochs=0.05, ada_iters=150, speed_rounds=3,
             speed_runs=5, test_images=2000)
    if quick:
        q.update(km4_epochs=0.02, km2_epochs=0.02, dc_prune_epochs=[0.02, 0.02, 0.02], dc_kmeans_epochs=0.02,
                 tern_epochs=0.02, ttq_epochs=0.02, bin_epochs=0.02, qat_epochs=0.02, ada_iters=5, speed_rounds=1,
                 speed_runs=2, test_images=500)
    return q


class State:
    """The checkpoint, data, schedule and finished sections every part reads (``sections`` is what
    --partial saves and --resume reuses)."""

    def __init__(self, args: argparse.Namespace, rec: BenchmarkRecord):
        quick = self.quick = args.quick
        self.args, self.rec, self.q = args, rec, schedule(quick)
        q = self.q
        ckpt = find_checkpoint(VGG_CHECKPOINTS, args.checkpoint)
        if ckpt is None or not ckpt.is_file():
            raise SystemExit(f"no VGG Fashion-MNIST checkpoint found (tried {args.checkpoint or VGG_CHECKPOINTS})")
        self.base, meta = load_checkpoint(ckpt, device=args.device)
        self.base.eval()
        self.train, self.test = fashion_mnist_loaders(batch_size=128, augment=True, test_subset=q["test_images"],
                                                      train_subset=2000 if quick else None, eval_batch_size=500,
                                                      seed=3)
        calib_loader, val = fashion_mnist_loaders(batch_size=64, augment=False, train_subset=512, test_subset=200,
                                                  seed=1)
        self.calib = [b for b in calib_loader]                      # 8 batches of 64 training images
        self.val = fashion_mnist_loaders(batch_size=500, augment=False, train_subset=1000, seed=2)[0]
        self.val.shuffle = False
        _, self.test_small = fashion_mnist_loaders(batch_size=500, augment=False,
                                                   test_subset=500 if quick else 1000, eval_batch_size=500, seed=4)
        q["ref_test"] = fashion_mnist_loaders(batch_size=100, augment=False, test_subset=200, eval_batch_size=100,
                                              seed=5)[1]
        self.fp32, self.fp32_small = acc(self.base, self.test), acc(self.base, self.test_small)
        log("fp32", self.fp32, "checkpoint", ckpt)
        rec.results["setup"] = {"checkpoint": str(ckpt.relative_to(ROOT)) if ckpt.is_relative_to(ROOT) else str(ckpt),
                                "model": meta.get("model"), "model_kwargs": meta.get("model_kwargs"),
                                "fp32_accuracy": self.fp32, "test_images": len(self.test.data),
                                "train_threads": args.threads, "device": args.device, "quick": quick,
                                "calibration": f"{len(self.calib)} batches of 64 un-augmented training images",
                                "schedule": {k: v for k, v in q.items() if k != "ref_test"}}
        self.tmp = Path(tempfile.mkdtemp(prefix="quant_bench_"))
        self.models: dict = {}
        self.partial = Path(args.partial)
        self.sections = json.loads(self.partial.read_text()) if args.resume and self.partial.is_file() else {}


def _section(name: str, fn):
    """A part that computes one section (skipped when --resume found it; saved to --partial)."""
    def part(st: State) -> None:
        if name in st.sections:
            return
        st.sections[name] = fn(st)
        log(name, "done")
        if not st.quick:
            st.partial.write_text(json.dumps(st.sections, default=float))
    return part


def part_int8(st: State) -> None:
    """Integer-only int8/int4 per calibrator (sections calibrators, int8); keeps the best model for
    the speed parts. Not run with --only: the speed parts then need it from an earlier run."""
    if st.args.only is None and any(k not in st.sections for k in ("int8", "speed", "speed_1thread")):
        out, ms = bench_int8(st.base, st.calib, st.val, st.test, st.fp32, st.q)
        st.models.update(ms)
        st.sections.update(out)


def part_speed_1thread(st: State) -> None:
    q = st.q
    _section("speed_1thread", lambda s: bench_speed(s.base, s.models["best"], s.calib, 1,
                                                    max(1, q["speed_rounds"] // 2), q["speed_runs"]))(st)
    if st.args.only is None:
        log("speed", st.sections["speed"]["median_ms"], st.sections["speed_1thread"]["median_ms"])


# the sections in the order they run (they share one seeded random stream: keep the order)
PARTS = {
    "resnet20": _section("resnet20", lambda s: bench_resnet20()),
    "int8": part_int8,
    "speed": _section("speed", lambda s: bench_speed(s.base, s.models["best"], s.calib, s.args.latency_threads,
                                                     s.q["speed_rounds"], s.q["speed_runs"])),
    "speed_1thread": part_speed_1thread,
    "kmeans": _section("kmeans", lambda s: bench_kmeans(s.base, s.train, s.test, s.fp32, s.q)),
    "deep_compression": _section("deep_compression", lambda s: bench_deep_compression(s.base, s.train, s.test,
                                                                                      s.fp32, s.q, s.tmp)),
    "rounding": _section("rounding", lambda s: bench_rounding(s.base, s.calib, s.test, s.fp32, s.q)),
    "binary": _section("binary", lambda s: bench_binary(s.base, s.train, s.test, s.fp32, s.q)),
    "qat_lsq": _section("qat_lsq", lambda s: bench_qat(s.base, s.train, s.test, s.fp32, s.q)),
    "mixed_precision": _section("mixed_precision", lambda s: bench_mixed(
        s.base, s.calib, s.test_small, s.fp32_small,
        ROOT / "benchmarks" / "results" / "quantization_pareto.png" if not s.quick else s.tmp / "p.png")),
}


def record_targets(st: State) -> None:
    """Every target from the finished sections."""
    rec, sections, q = st.rec, st.sections, st.q
    km, i8, sp, dc, bn, rn = (sections["kmeans"], sections["int8"], sections["speed"], sections["deep_compression"],
                              sections["binary"], sections["resnet20"])
    rec.target("kmeans8_acc_drop", km["kmeans8"]["drop"], "<=", 0.2, "fp32 − k-means 8-bit accuracy, no fine-tuning")
    rec.target("kmeans4_acc_drop", km["kmeans4"]["drop"], "<=", 0.3,
               f"after {q['km4_epochs']} epoch of centroid fine-tuning (gradient grouping)")
    rec.target("kmeans2_acc_drop", km["kmeans2"]["drop"], "<=", 1.5,
               f"after {q['km2_epochs']} epoch of centroid fine-tuning")
    rec.target("int8_acc_drop", i8["drop"], "<=", 0.3,
               f"integer-only int8, per-channel weights, BN folded, calibrator {i8['best_observer']} "
               "(chosen on held-out training images), real int8 kernels")
    rec.target("int8_cpu_speedup_bs64", round(sp["speedup_vs_fp32"], 3), ">=", 2.0,
               f"fp32 eager latency / our int8 latency, batch 64, {sp['threads']} threads, median of "
               f"{sp['rounds']} interleaved rounds on a shared CPU")
    rec.target("int8_speed_vs_torch_int8", round(sp["torch_ao_over_ours"], 3), ">=", 1.0,
               "torch.ao FX int8 (x86) latency / ours, same model, calibration, batch and threads, same run")
    rec.target("deep_compression_ratio", round(dc["ratio"], 2), ">=", 30,
               "fp32 safetensors state dict bytes / .emdc file bytes (everything on disk)")
    dc_bits = ", ".join(f"{k.rsplit('.', 1)[-1]} {v}-bit" for k, v in q["dc_layer_bits"].items())
    rec.target("deep_compression_acc_drop", dc["drop"], "<=", 0.5,
               f"accuracy of the model loaded back from the file; iterative pruning with "
               f"{sum(q['dc_prune_epochs'])} epochs of masked fine-tuning"
               f"{' distilled from the dense model' if q['dc_distill'] else ''}, {q['dc_bits']}-bit k-means "
               f"({dc_bits}), "
               f"{q['dc_kmeans_epochs']} epoch of centroid fine-tuning, {q['dc_float_dtype']} BN/biases/codebooks")
    rec.target("twn_acc_drop", bn["twn"]["drop"], "<=", 2.0, f"after {q['tern_epochs']} epoch of QAT")
    rec.target("ttq_acc_drop", bn["ttq"]["drop"], "<=", 2.0, f"after {q['ttq_epochs']} epochs of QAT")
    best_rn = max(rn["runs"].items(), key=lambda kv: (kv[1]["agreement"], kv[1]["sqnr_db"]))
    rec.results["resnet20"]["reported"] = best_rn[0]
    rec.target("resnet20_int8_agreement", best_rn[1]["agreement"], ">=", 19,
               f"top-1 agreement with fp32 on the 20 CIFAR samples ({best_rn[0]})")
    rec.target("resnet20_int8_sqnr_db", round(best_rn[1]["sqnr_db"], 2), ">=", 25, f"logit SQNR vs fp32 ({best_rn[0]})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_part_options(ap, PARTS, quick=False, merge=False, out=False)
    ap.add_argument("--quick", action="store_true", help="tiny subsets and iteration counts; JSON only with --out")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--latency-threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/quantization.json)")
    ap.add_argument("--partial", default="/tmp/quantization_partial.json",
                    help="sections finished so far are saved here; --resume reuses them")
    ap.add_argument("--resume", action="store_true", help="skip sections already in --partial")
    ap.add_argument("--only", nargs="*", default=None, help="run only these sections (saved to --partial, no JSON)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for training and evaluation")
    ap.add_argument("--device", default="cpu", help="device for the training sections run with --only "
                    "(kmeans, deep_compression, binary); the committed JSON is measured on CPU")
    args = ap.parse_args(argv)
    if args.parts and args.only is None:  # --parts is --only under the shared name
        args.only = selected_parts(PARTS, args.parts)
    names = list(PARTS) if args.only is None else selected_parts(PARTS, ",".join(args.only)) if args.only else []
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rec = BenchmarkRecord("quantization")
    st = State(args, rec)
    if st.sections:
        log("resuming with sections", sorted(st.sections))
        rec.results["setup"]["sections_from_partial_file"] = {
            "sections": sorted(st.sections), "note": "computed by earlier runs (--only/--resume) and reused as saved; "
            "the other sections were computed by this run"}
    t0 = time.perf_counter()
    run_parts(PARTS, names, st)
    if args.only is not None:
        log("only", args.only, "done; saved to", st.partial)
        return 0
    st.sections["seconds_total"] = round(time.perf_counter() - t0, 1)
    rec.results.update(st.sections)
    record_targets(st)
    for t in rec.targets:
        log("target", t)
    if not args.quick or args.out:  # a quick run writes only where --out says (never the committed file)
        log("wrote", rec.write(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
