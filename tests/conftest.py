"""Suite-wide set-up. Triton decides interpreter-or-compiler when a kernel is decorated, so
TRITON_INTERPRET must be set before anything imports dpfast's kernels (no CUDA: run interpreted)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster than several on a shared machine (OpenMP threads
    spin-wait for each other). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
