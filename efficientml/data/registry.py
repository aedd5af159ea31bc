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
    loaders: Callable[..., tuple[Any, Any]]   # (batch_size=, augment=, ...) -> (train, test)


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def _fmnist(**kw: Any) -> tuple[Any, Any]:
    from efficientml.data.fashion_mnist import fashion_mnist_loaders

    return fashion_mnist_loaders(**kw)


DATASETS.register("fashion-mnist", DatasetSpec("fashion-mnist", 1, 10, 28, _fmnist))


def get_dataset(name: str) -> DatasetSpec:
    return DATASETS.get(name)
