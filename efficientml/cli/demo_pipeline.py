"""The CNN story end to end, the job ``efficientml demo`` runs: the trained course VGG on Fashion-MNIST
(checkpoints/vgg_fmnist.safetensors) → profile → channel prune + KD fine-tune from the unpruned model →
integer-only int8 → the engine's generated C, compiled here and checked bit-exact → one before/after
table of params, weight size, MACs, peak activation memory, measured latency and test accuracy per stage.

Every number says how it was obtained: accuracy is measured on real Fashion-MNIST test images, latency is
measured on this machine (batch 1, median), sizes and MACs are computed from the model, peak memory is
computed (analysis's per-layer schedule) except the engine's, which is the static arena the generated C
declares. The pipeline lives in the CLI layer because it composes prune, distill, quant and engine,
which do not import one another.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

STAGES = ("baseline fp32", "pruned + KD fp32", "int8 (PyTorch kernels)", "int8 engine (generated C)")
OUTPUTS = ("report.json", "report.md", "pipeline.png", "vgg_fmnist_engine.c", "vgg_fmnist_engine.h")


@dataclass
class DemoConfig:
    ratio: float = 0.5                 # channels removed from each prunable conv
    finetune_images: int = 12000       # training images seen by the KD fine-tune (one pass)
    test_images: int = 10000           # Fashion-MNIST test images for every accuracy
    threads: int = 2
    runs: int = 30                     # timed batch-1 runs per stage
    kd_temperature: float = 2.0


def _latency(fn, x: torch.Tensor, runs: int, threads: int) -> float:
    from efficientml.analysis import measure_latency

    return measure_latency(fn, x, warmup=5, runs=runs, threads=threads).median_ms


def _accuracy(fn, test, limit: int) -> float:
    correct = total = 0
    with torch.inference_mode():
        for x, y in test:
            out = fn(x)
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
            if total >= limit:
                break
    return 100.0 * correct / max(1, total)


def _float_row(name: str, model, sample: torch.Tensor, test, cfg: DemoConfig) -> dict[str, Any]:
    from efficientml.analysis import profile

    prof = profile(model, tuple(sample.shape), name=name)
    return {"stage": name, "params": prof.params, "weight_bytes": 4 * prof.params, "macs": prof.macs,
            "peak_activation_bytes": prof.peak_activation_bytes(32), "peak_kind": "computed (per-layer, fp32)",
            "latency_ms": _latency(model, sample, cfg.runs, cfg.threads),
            "accuracy": _accuracy(model, test, cfg.test_images)}


def _prune_kd(model, train, sample: torch.Tensor, cfg: DemoConfig):
    from efficientml.distill import TeacherLoss
    from efficientml.prune import PruneConfig, prune, recalibrate_bn
    from efficientml.train import TrainConfig, fit

    res = prune(copy.deepcopy(model), PruneConfig(method="channel", sparsity=cfg.ratio, criterion="l2"),
                example_inputs=sample.repeat(2, 1, 1, 1))
    pruned = res.model
    recalibrate_bn(pruned, [b for _, b in zip(range(8), train)])
    epochs = cfg.finetune_images / len(train.data)
    ft = TrainConfig(epochs=epochs, lr=0.01, schedule="cosine", warmup_frac=0.0)
    with TeacherLoss(model, pruned, temperature=cfg.kd_temperature, weight=1.0) as kd:
        fit(pruned, train, ft, extra_loss=kd, progress=False)
    return pruned.eval(), {"prune": {"method": "channel", "criterion": "l2", "ratio": cfg.ratio},
                           "finetune": {**ft.to_dict(), "images": cfg.finetune_images,
                                        "teacher": "the unpruned VGG", "kd_temperature": cfg.kd_temperature}}


def _int8_rows(pruned, train, test, sample: torch.Tensor, cfg: DemoConfig, out: Path) -> tuple[list, dict]:
    from efficientml.analysis import profile
    from efficientml.engine import compile_engine
    from efficientml.quant.integer import IntegerConfig, convert_integer

    calib = [b for _, b in zip(range(4), train)]
    im = convert_integer(pruned, calib, IntegerConfig(observer="minmax"))
    fast = im.with_mode("fast")
    prof = profile(pruned, tuple(sample.shape))
    int8 = {"stage": STAGES[2], "params": prof.params, "weight_bytes": im.size_bytes(), "macs": prof.macs,
            "peak_activation_bytes": prof.peak_activation_bytes(8), "peak_kind": "computed (per-layer, int8)",
            "latency_ms": _latency(fast, sample, cfg.runs, cfg.threads),
            "accuracy": _accuracy(fast, test, cfg.test_images)}
    t0 = time.perf_counter()
    eng = compile_engine(im, sample, prefix="vgg_fmnist_engine")
    build = time.perf_counter() - t0
    c_path, h_path = eng.generated.write(out)
    checked = mismatched = 0
    with torch.inference_mode():
        for x, _ in test:
            got, ref = eng.run(x), im.integer_output(x)
            checked, mismatched = checked + len(x), mismatched + int((got != ref).any(1).sum())
            if checked >= min(2000, cfg.test_images):
                break
    engine = {**int8, "stage": STAGES[3], "peak_activation_bytes": eng.plan.arena_bytes,
              "peak_kind": "the generated C's static arena (planned)",
              "latency_ms": _latency(eng.run, sample, cfg.runs, cfg.threads),
              "accuracy": _accuracy(eng.run, test, cfg.test_images)}
    info = {"c_source": str(c_path), "header": str(h_path), "build_seconds": round(build, 2),
            "bit_exact": {"images": checked, "mismatched_images": mismatched}, "isa": getattr(eng, "isa", None),
            "plan": {k: v for k, v in eng.plan.to_dict().items() if k != "op_live_bytes"},
            "mcu": _mcu(eng, sample)}
    return [int8, engine], info


def _mcu(eng, sample: torch.Tensor) -> dict[str, Any]:
    """Flash/SRAM of the generated C built for a Cortex-M3 (engine.mcu's firmware build), where the tool
    chain is installed."""
    import tempfile

    from efficientml.engine.mcu import build_firmware, missing_tools

    if missing_tools():
        return {"skipped": f"not installed: {', '.join(missing_tools())} (Debian: gcc-arm-none-eabi "
                           "libnewlib-arm-none-eabi)"}
    codes = eng.im.program.instrs[0].step.integer(sample)
    with tempfile.TemporaryDirectory(prefix="eml-demo-mcu-") as tmp:
        res = build_firmware(eng.generated, codes, tmp)
    return {"flash_kb": res.flash_bytes / 1024, "sram_kb": res.sram_bytes / 1024,
            "how": "arm-none-eabi-size of the model's object"}


def run_demo(out: Path, cfg: DemoConfig) -> dict[str, Any]:
    """Run the pipeline, write the C, the report (JSON, Markdown) and the plot into ``out``; the report."""
    from efficientml.analysis.record import find_checkpoint
    from efficientml.core.errors import ConfigError
    from efficientml.data import fashion_mnist_loaders
    from efficientml.train import load_checkpoint

    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    ck = find_checkpoint(["vgg_fmnist.safetensors"])
    if ck is None:
        raise ConfigError("the demo's checkpoint checkpoints/vgg_fmnist.safetensors is missing; restore it from "
                          "the repository or train it: efficientml train vgg --dataset fashion-mnist --epochs 15 "
                          "--lr 0.1 --model-arg width=0.25")
    model, meta = load_checkpoint(ck)
    model.eval()
    train, test = fashion_mnist_loaders(batch_size=128, augment=False, test_subset=cfg.test_images, seed=0)
    sample = next(iter(test))[0][:1]
    rows = [_float_row(STAGES[0], model, sample, test, cfg)]
    pruned, recipe = _prune_kd(model, train, sample, cfg)
    rows.append(_float_row(STAGES[1], pruned, sample, test, cfg))
    int8_rows, engine = _int8_rows(pruned, train, test, sample, cfg, out)
    rows += int8_rows
    return {"model": "vgg (width 0.25), trained on Fashion-MNIST", "checkpoint": ck.name,
            "checkpoint_test_accuracy": meta.get("test_accuracy"), "config": cfg.__dict__, "stages": rows,
            "recipe": recipe, "engine": engine, "seconds": round(time.perf_counter() - t0, 1),
            "how_measured": {"accuracy": f"measured on {cfg.test_images} Fashion-MNIST test images",
                             "latency_ms": f"measured, batch 1, {cfg.threads} threads, median of {cfg.runs} runs",
                             "params/weight_bytes/macs": "computed from the model",
                             "peak_activation_bytes": "see each row's peak_kind"}}
