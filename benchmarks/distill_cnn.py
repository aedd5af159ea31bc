"""The Fashion-MNIST side of benchmarks/distill.py: the shared protocol (:class:`Env`: data, teacher, student,
recipe, one cached list of accuracies per arm over the seeds) and the parts whose methods need no
pretrained teacher or train several models (``peers``), and KD as the recovery after pruning (``pruned``)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from efficientml.analysis.record import find_checkpoint, log


def mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "per_seed": [round(x, 2) for x in xs]}


class Env:
    """Data, teacher, student and recipe every arm shares; ``arm(name)`` trains that arm once per seed
    (cached, so parts share the student-alone control) and returns the test accuracies."""

    def __init__(self, quick: bool, seeds: int, rec) -> None:
        self.quick, self.rec = quick, rec
        self.seeds = tuple(range(1 if quick else seeds))
        self.train_subset = 512 if quick else 10000
        self.test_subset = 512 if quick else None
        self.epochs = 0.5 if quick else 6.0
        self.val_size = 512 if quick else 5000
        self.temperatures = (1.0, 4.0) if quick else (1.0, 2.0, 4.0)
        self._temperature: float | None = None
        self.feature_methods: tuple[str, ...] = ()
        self.batch = 64 if quick else 128
        self.width = 0.25
        self._teacher = None
        self._arms: dict[str, list[float]] = {}
        self.extra: dict[str, list] = {}  # per-seed side results of an arm (ensembles, heads)
        self.seconds: dict[str, float] = {}

    def protocol(self) -> dict:
        return {"dataset": "fashion-mnist", "train_subset": self.train_subset, "test_subset": self.test_subset,
                "epochs": self.epochs, "batch": self.batch, "seeds": list(self.seeds),
                "validation": {"size": self.val_size, "source": "training images outside seed 0's training subset",
                               "used_for": "the KD temperature only", "temperatures_tried": list(self.temperatures)},
                "student": {"model": "small_cnn", "width": self.width}, "teacher": self.teacher_info,
                "recipe": self.recipe(0).to_dict()}

    @property
    def teacher_info(self) -> dict:
        self.teacher()
        return self._teacher_info

    def teacher(self):
        if self._teacher is None:
            from efficientml.models.registry import build_model
            from efficientml.train import load_checkpoint

            path = find_checkpoint(["vgg_fmnist.safetensors"])
            if path is None:
                if not self.quick:
                    raise SystemExit("no checkpoints/vgg_fmnist.safetensors; train it first: efficientml train vgg "
                                     "--dataset fashion-mnist --epochs 15 --lr 0.1 --model-arg width=0.25")
                torch.manual_seed(0)
                self._teacher, self._teacher_info = build_model("vgg", in_channels=1, width=0.25), {"note": "random"}
            else:
                self._teacher, meta = load_checkpoint(path)
                self._teacher_info = {"checkpoint": path.name, "model": meta.get("model"),
                                      "model_kwargs": meta.get("model_kwargs"),
                                      "test_accuracy": meta.get("test_accuracy")}
            self._teacher.eval()
        return self._teacher

    def student(self, seed: int, width: float | None = None):
        from efficientml.models.registry import build_model

        torch.manual_seed(seed)
        return build_model("small_cnn", in_channels=1, width=self.width if width is None else width)

    def loaders(self, seed: int):
        from efficientml.data.fashion_mnist import fashion_mnist_loaders

        return fashion_mnist_loaders(batch_size=self.batch, augment=False, train_subset=self.train_subset,
                                     test_subset=self.test_subset, seed=seed)

    def val_loader(self):
        """Held-out validation images: training images outside seed 0's training subset (the test set is
        never used to choose anything)."""
        from efficientml.data.fashion_mnist import load_fashion_mnist
        from efficientml.data.loader import ImageTensors, TensorLoader

        train = load_fashion_mnist("train")
        g = torch.Generator().manual_seed(0)                 # the permutation ImageTensors.subset(n, 0) uses
        idx = torch.randperm(len(train), generator=g)[self.train_subset:self.train_subset + self.val_size]
        held = ImageTensors(train.images[idx], train.labels[idx], train.mean, train.std, train.classes)
        return TensorLoader(held, 512, shuffle=False)

    def temperature(self) -> float:
        """The KD temperature, chosen once by validation accuracy of seed 0's KD student (alpha 0.9) over
        ``temperatures``; every distiller then uses it."""
        if self._temperature is None:
            from efficientml.distill import DistillConfig, distill
            from efficientml.train.loop import evaluate

            val, scores = self.val_loader(), {}
            for t in self.temperatures:
                train, _ = self.loaders(0)
                s = self.student(0)
                distill(s, self.teacher(), train, DistillConfig(method="kd", temperature=t), self.recipe(0),
                        progress=False)
                scores[t] = evaluate(s, val)["accuracy"]
                log(f"KD T={t:g}: validation {scores[t]:.2f}")
            self._temperature = max(scores, key=scores.get)
            self.rec.results["temperature_selection"] = {"validation_accuracy": {str(k): v for k, v in scores.items()},
                                                         "chosen": self._temperature}
        return self._temperature

    def reuse(self, arms: dict[str, list[float]]) -> None:
        """Accuracies an earlier run of the same protocol measured, used instead of training again."""
        for name, accs in arms.items():
            if len(accs) != len(self.seeds):
                raise SystemExit(f"--reuse-arms: arm {name!r} has {len(accs)} accuracies, expected one per seed")
            self._arms[name] = [float(a) for a in accs]
        self.rec.results["reused_arms"] = {"arms": arms, "note": "measured by an earlier run of this benchmark "
                                           "(same code, protocol and seeds), not trained again"}

    def set_temperature(self, t: float) -> None:
        self._temperature = t
        self.rec.results["temperature_selection"] = {"chosen": t, "note": "given on the command line (--temperature)"}

    def recipe(self, seed: int, epochs: float | None = None, lr: float = 0.05):
        from efficientml.train import TrainConfig

        return TrainConfig(epochs=self.epochs if epochs is None else epochs, lr=lr, schedule="cosine",
                           warmup_frac=0.1, seed=seed)

    def arm(self, name: str, run: Callable[[int], float] | None = None) -> list[float]:
        """Test accuracy per seed of arm ``name`` (trained on first use; ``run(seed)`` → accuracy, default
        the offline distiller with ``method=name``)."""
        if name not in self._arms:
            t0 = time.perf_counter()
            self._arms[name] = [(run or self._offline(name))(s) for s in self.seeds]
            self.seconds[name] = time.perf_counter() - t0
            self.rec.results.setdefault("arm_seconds", {})[name] = round(self.seconds[name], 1)
            log(name, [round(a, 2) for a in self._arms[name]], f"{self.seconds[name]:.0f} s")
        return self._arms[name]

    def _offline(self, name: str) -> Callable[[int], float]:
        from efficientml.distill import DistillConfig, distill
        from efficientml.train import fit
        from efficientml.train.loop import evaluate

        def run(seed: int) -> float:
            train, test = self.loaders(seed)
            s = self.student(seed)
            if name == "alone":
                fit(s, train, self.recipe(seed), progress=False)
            else:
                method, correct = (name[:-len("_teacher_correct")], True) if name.endswith("_teacher_correct") \
                    else (name, False)
                cfg = DistillConfig(method=method, temperature=self.temperature(), only_where_teacher_correct=correct)
                distill(s, self.teacher(), train, cfg, self.recipe(seed), progress=False)
            return evaluate(s, test)["accuracy"]
        return run


def _pruned_once(env: Env, ratio: float, seed: int) -> dict:
    """VGG channel-pruned at ``ratio`` (L2), BN recalibrated, then fine-tuned plain and with KD from the
    unpruned VGG, the same epochs, data and learning rate; test accuracies."""
    import copy

    from efficientml.analysis import count_macs
    from efficientml.distill import TeacherLoss
    from efficientml.prune import PruneConfig, prune, recalibrate_bn
    from efficientml.train import fit
    from efficientml.train.loop import evaluate

    teacher = env.teacher()
    train, test = env.loaders(seed)
    res = prune(copy.deepcopy(teacher), PruneConfig(method="channel", sparsity=ratio, criterion="l2"),
                example_inputs=torch.randn(2, 1, 28, 28))
    recalibrate_bn(res.model, [b for _, b in zip(range(4), train)])
    out = {"pruned": evaluate(res.model, test)["accuracy"]}
    ft = env.recipe(seed, epochs=1.0 if not env.quick else 0.5, lr=0.01)
    for arm in ("plain", "kd"):
        m = copy.deepcopy(res.model)
        if arm == "kd":
            with TeacherLoss(teacher, m, temperature=env.temperature(), weight=1.0) as tl:
                fit(m, train, ft, extra_loss=tl, progress=False)
        else:
            fit(m, train, ft, progress=False)
        out[arm] = evaluate(m, test)["accuracy"]
    out["macs_fraction"] = count_macs(res.model, (1, 1, 28, 28)).macs / count_macs(teacher, (1, 1, 28, 28)).macs
    return out


def part_pruned(env: Env) -> None:
    from efficientml.train.loop import evaluate

    base = evaluate(env.teacher(), env.loaders(0)[1])["accuracy"]
    tried = {}
    # the mildest ratio at which plain fine-tuning leaves >= 1 point (scanned from mild to severe)
    for ratio in (0.3, 0.5, 0.6, 0.75, 0.85, 0.9):
        first = _pruned_once(env, ratio, env.seeds[0])
        tried[ratio] = first
        log("pruned", ratio, first)
        if base - first["plain"] >= 1.0 or env.quick:
            break
    runs = [first] + [_pruned_once(env, ratio, s) for s in env.seeds[1:]]
    plain, kd = [r["plain"] for r in runs], [r["kd"] for r in runs]
    drop_plain = base - statistics.mean(plain)
    recovery = (statistics.mean(kd) - statistics.mean(plain)) / drop_plain if drop_plain > 0 else None
    env.rec.results["pruned"] = {"base_accuracy": base, "ratio": ratio, "tried": {str(k): v for k, v in tried.items()},
                                 "plain": mean_std(plain), "kd": mean_std(kd), "runs": runs,
                                 "recipe": env.recipe(0, epochs=1.0, lr=0.01).to_dict()}
    env.rec.target("pruned_vgg_kd_recovery", recovery, ">=", 0.5,
                   f"fraction of the drop left by plain fine-tuning ({drop_plain:.2f} points at channel ratio {ratio}) "
                   f"that KD fine-tuning recovers, equal epochs, mean over seeds {list(env.seeds)}")


def _peers(env: Env) -> None:
    from benchmarks.distill_peers import part_peers

    part_peers(env)


PEER_PARTS: dict[str, Callable] = {"peers": _peers, "pruned": part_pruned}
