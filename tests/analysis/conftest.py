import pytest
import torch


_ZOO: dict = {}


@pytest.fixture(scope="session")
def zoo():
    """``zoo("resnet18")``: a zoo model built once per test session (tests must not modify it)."""
    from efficientml.models import build_model

    def get(name: str):
        if name not in _ZOO:
            torch.manual_seed(0)
            _ZOO[name] = build_model(name).eval()
        return _ZOO[name]

    return get
