"""Parts of benchmarks/finetune.py kept in their own file: TinyTL and DoRA's cost.

- ``tinytl``: the pretrained CIFAR-10 ResNet-20 transferred to Fashion-MNIST (28→32 px, gray → 3
  channels, a new 10-class head) by full fine-tuning, last-layer only, BitFit and TinyTL: test
  accuracy, and training memory *measured* at the training batch (bytes autograd keeps for backward
  via saved-tensor hooks, plus parameters, gradients and AdamW state: finetune.memory).
  ``tinytl_memory_vs_full_ft`` (total training memory) and ``tinytl_acc_drop_vs_full_ft`` (points).
- ``dora``: median training-step time (forward+backward+AdamW) of DoRA vs LoRA, r=16 on every block
  linear of SmolLM2-135M, same batch and threads, steps interleaved: DoRA's extra cost (peft #1474).
"""

from __future__ import annotations

import statistics
import time

import torch

from efficientml.analysis.record import log
from efficientml.core.errors import DataNotFoundError

CNN_LR = {"full": 1e-3, "last-layer": 1e-2, "bitfit": 5e-3, "tinytl": 5e-3}


def cnn_budget(quick: bool) -> dict:
    if quick:
        return {"train_subset": 256, "test_subset": 256, "batch": 32, "epochs": 1.0}
    return {"train_subset": 20000, "test_subset": None, "batch": 64, "epochs": 3.0}


def part_tinytl(r) -> None:
    from efficientml.data.fashion_mnist import fashion_mnist_loaders
    from efficientml.finetune.transfer import CNN_METHODS, ChannelRepeat, prepare_cnn, transfer
    from efficientml.models.registry import build_model
    from efficientml.train import TrainConfig

    b = cnn_budget(r.quick)
    try:
        build_model("resnet20", pretrained=True)
    except DataNotFoundError as e:
        for tid, op, th in (("tinytl_memory_vs_full_ft", "<=", 0.3), ("tinytl_acc_drop_vs_full_ft", "<=", 2.0)):
            r.rec.target(tid, None, op, th, f"pretrained CIFAR ResNet-20 not found ({e})")
        return
    train, test = fashion_mnist_loaders(batch_size=b["batch"], augment=False, pad_to=32, seed=0,
                                        train_subset=b["train_subset"], test_subset=b["test_subset"])
    train, test = ChannelRepeat(train, 3), ChannelRepeat(test, 3)
    table = {}
    for method in CNN_METHODS:
        model, config = prepare_cnn(build_model("resnet20", pretrained=True), method, 10)
        cfg = TrainConfig(epochs=b["epochs"], lr=CNN_LR[method], optimizer="adamw", weight_decay=0.0,
                          schedule="cosine", warmup_frac=0.05, seed=0)
        t0 = time.perf_counter()
        rep = transfer(model, train, test, cfg, progress=False)
        table[method] = {"accuracy": rep["accuracy"], "memory": rep["memory"], "trainable": rep["trainable"],
                         "lr": CNN_LR[method], "seconds": time.perf_counter() - t0,
                         "config": config.to_dict() if config is not None else None}
        log(method, f"acc {rep['accuracy']:.2f}%", f"memory {rep['memory']['total_bytes'] / 2**20:.1f} MiB",
            f"activations {rep['memory']['activation_bytes'] / 2**20:.1f} MiB")
    full = table["full"]
    for m in table.values():
        m["memory_vs_full_ft"] = m["memory"]["total_bytes"] / full["memory"]["total_bytes"]
        m["activations_vs_full_ft"] = m["memory"]["activation_bytes"] / full["memory"]["activation_bytes"]
        m["acc_drop_vs_full_ft"] = full["accuracy"] - m["accuracy"]
    r.rec.results["tinytl"] = {"budget": b, "model": "resnet20 (CIFAR-10 pretrained)", "dataset": "fashion-mnist",
                               "methods": table}
    r.rec.target("tinytl_memory_vs_full_ft", table["tinytl"]["memory_vs_full_ft"], "<=", 0.3,
                 f"measured training memory (saved activations + params + grads + AdamW), batch {b['batch']}, "
                 "TinyTL ÷ full fine-tuning")
    r.rec.target("tinytl_acc_drop_vs_full_ft", table["tinytl"]["acc_drop_vs_full_ft"], "<=", 2.0,
                 "Fashion-MNIST test accuracy points, full fine-tuning − TinyTL, same epochs")


def part_dora(r) -> None:
    from efficientml.finetune import LoRAConfig
    from efficientml.finetune.recipe import prepare
    from efficientml.finetune.sft import token_loss
    from efficientml.llm.io.load import load

    batch, length, steps = (2, 32, 2) if r.quick else (4, 128, 6)
    models = {k: prepare(load("smollm2-135m")[0], "lora", LoRAConfig(rank=16, alpha=32, dora=k == "dora"))
              for k in ("lora", "dora")}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5) for k, m in models.items()}
    ids = torch.randint(0, 49152, (batch, length + 1), generator=torch.Generator().manual_seed(5))
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(1 + steps):
        for k, m in models.items():
            m.train()
            t0 = time.perf_counter()
            loss, n = token_loss(m, ids, ids)
            opts[k].zero_grad()
            (loss / n).backward()
            opts[k].step()
            if i:  # the first round is warm-up
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    r.rec.results["dora"] = {"batch": batch, "length": length, "threads": torch.get_num_threads(),
                             "median_step_s": med, "dora_step_time_vs_lora": med["dora"] / med["lora"]}
    log("dora", f"step {med['dora']:.3f}s vs LoRA {med['lora']:.3f}s")
