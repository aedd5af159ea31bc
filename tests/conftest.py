"""Test configuration: CPU by default; ``@pytest.mark.cuda`` tests skip cleanly without a GPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels (where Triton is installed) run in its CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin-wait against other processes
    and run several times slower. Code that measures latency sets its own thread count."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def pretrained_cifar():
    """``pretrained_cifar(name)`` → (model, x, y): a pretrained CIFAR ResNet from ../shared (eval
    mode) and the 20 CIFAR-10 samples, normalized as it was trained. Missing files fail the test
    (CI has them) instead of skipping it."""
    from efficientml.data.cifar_samples import load_cifar_samples
    from efficientml.models import build_model
    from efficientml.models.resnet_cifar import PRETRAINED_MEAN, PRETRAINED_STD

    def load(name: str):
        model = build_model(name, pretrained=True).eval()
        x, y = load_cifar_samples(normalize=True, mean=PRETRAINED_MEAN, std=PRETRAINED_STD)
        return model, x, y

    return load

