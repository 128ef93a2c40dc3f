"""Suite-wide set-up. Triton decides interpreter-or-compiler when a kernel is decorated, so
TRITON_INTERPRET must be set before anything imports dpfast's kernels (no CUDA: run interpreted)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
