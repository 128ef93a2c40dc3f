"""Full-precision fp32 for the engine's own arithmetic (norms and clipped sums)."""
from __future__ import annotations

import contextlib
import inspect

import torch

__all__ = ["exact_fp32"]


def _cudnn_flags(**want):
    """torch.backends.cudnn.flags() that changes only `want` (its defaults would reset the rest)."""
    cudnn = torch.backends.cudnn
    params = inspect.signature(cudnn.flags).parameters
    current = {"enabled": cudnn.enabled, "benchmark": cudnn.benchmark,
               "deterministic": cudnn.deterministic,
               "benchmark_limit": getattr(cudnn, "benchmark_limit", None)}
    kwargs = {k: v for k, v in {**current, **want}.items() if k in params and v is not None}
    return cudnn.flags(**kwargs)


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls and convolutions at full precision inside the engine, whatever the training
    script chose for its own (TF32 through `torch.set_float32_matmul_precision("high")` or cuDNN's
    default `allow_tf32=True`): TF32 rounds each input to 10 mantissa bits, an error in the clipped
    sum that grows with the batch like bf16's.  Restores the caller's settings on exit."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with _cudnn_flags(allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)
