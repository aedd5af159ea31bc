import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The CPU is shared: one intra-op thread avoids OpenMP spin contention and keeps tests fast."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
