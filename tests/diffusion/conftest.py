import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The diffusion tests use tiny tensors: one intra-op thread is faster than several, and far
    faster on a loaded machine, where OpenMP threads spin-wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
