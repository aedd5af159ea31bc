"""Datasets and their path resolution (see :mod:`efficientml.data.paths`)."""

from efficientml.data.fashion_mnist import fashion_mnist_loaders, load_fashion_mnist
from efficientml.data.loader import ImageTensors, TensorLoader
from efficientml.data.paths import resolve

__all__ = ["ImageTensors", "TensorLoader", "fashion_mnist_loaders", "load_fashion_mnist", "resolve"]
