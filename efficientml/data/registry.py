"""Image-classification datasets by name, for the CLI and benchmarks: what the model needs to know
(channels, classes, image size) and how to build (train, test) loaders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from efficientml.core.registry import Registry


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    in_channels: int
    num_classes: int
    image_size: int
    short: str                                # used in default file names: checkpoints/vgg_fmnist…
    loaders: Callable[..., tuple[Any, Any]]   # (batch_size=, augment=, ...) -> (train, test)


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def _fmnist(**kw: Any) -> tuple[Any, Any]:
    from efficientml.data.fashion_mnist import fashion_mnist_loaders

    return fashion_mnist_loaders(**kw)


DATASETS.register("fashion-mnist", DatasetSpec("fashion-mnist", 1, 10, 28, "fmnist", _fmnist))


def _digits(batch_size: int = 128, augment: bool = False, pad_to: int | None = None,
            train_subset: int | None = None, test_subset: int | None = None, root: Any = None,
            seed: int = 0, eval_batch_size: int = 512, test_only: bool = False) -> tuple[Any, Any]:
    import torch

    from efficientml.data.digits import load_digits
    from efficientml.data.loader import ImageTensors, TensorLoader

    def tensors(split: str) -> ImageTensors:
        x, y = load_digits(split, seed=seed)                       # (N, 1, 8, 8) in [0, 1]
        return ImageTensors((x * 255).round().to(torch.uint8), y, (0.3053,), (0.3760,))

    train, test = tensors("train"), tensors("test")
    if test_only:
        return None, TensorLoader(test.subset(test_subset, seed) if test_subset else test, eval_batch_size,
                                  pad_to=pad_to)
    if train_subset:
        train = train.subset(train_subset, seed)
    if test_subset:
        test = test.subset(test_subset, seed)
    return (TensorLoader(train, batch_size, shuffle=True, augment=augment, pad_to=pad_to, crop_padding=1,
                         seed=seed),
            TensorLoader(test, eval_batch_size, pad_to=pad_to))


DATASETS.register("digits", DatasetSpec("digits", 1, 10, 8, "digits", _digits))


def get_dataset(name: str) -> DatasetSpec:
    return DATASETS.get(name)
