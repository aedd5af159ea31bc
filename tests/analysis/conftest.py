import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The test machine's cores are shared; one intra-op thread avoids oversubscription."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


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
