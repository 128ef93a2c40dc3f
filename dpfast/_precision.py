"""Full-precision fp32 for the engine's own arithmetic (per-sample norms and clipped sums).

The training script owns autocast and the TF32 settings; the engine's arithmetic must not inherit
them: an autocast matmul rounds its output to bf16 and TF32 rounds its inputs to 10 mantissa bits,
and either error in the clipped sum grows with the batch (it is a fraction of the sum, not of one
sample's contribution), which the accountant does not see.  `exact_fp32()` turns both off for the
engine's code and puts the caller's settings back exactly as they were, on exit or on error.
"""
from __future__ import annotations

import contextlib
import inspect

import torch

__all__ = ["exact_fp32"]

# torch >= 2.9: per-backend `fp32_precision` ("ieee" | "tf32" | "bf16" | "none" = inherit).  Mixing
# it with the legacy flags (allow_tf32, set_float32_matmul_precision) makes torch raise on the
# legacy getters, so where the new API exists only it is touched.
_NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


_BACKENDS = None


def _fp32_backends():
    """The backends whose fp32 precision can be relaxed: oneDNN's, and CUDA's where CUDA exists (on a
    machine without it nothing runs there, and each setting costs microseconds to read and write,
    per layer per step)."""
    global _BACKENDS
    if _BACKENDS is None:
        b = torch.backends
        objs = [getattr(b.mkldnn, "matmul", None), getattr(b.mkldnn, "conv", None)]
        if torch.cuda.is_available():
            objs += [b.cuda.matmul, getattr(b.cudnn, "conv", None)]
        _BACKENDS = tuple(o for o in objs if o is not None and hasattr(o, "fp32_precision"))
    return _BACKENDS


@contextlib.contextmanager
def _ieee_new_api():
    saved = [(o, o.fp32_precision) for o in _fp32_backends()]
    try:
        for o, _ in saved:
            o.fp32_precision = "ieee"
        yield
    finally:
        for o, value in reversed(saved):
            o.fp32_precision = value


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
def _ieee_legacy_api():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with _cudnn_flags(allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


@contextlib.contextmanager
def exact_fp32():
    """No autocast and no TF32/bf16 'fast fp32' inside: the engine's matmuls and convolutions on
    fp32 tensors run in IEEE fp32 whatever the training script enabled around them."""
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        stack.enter_context(_ieee_new_api() if _NEW_API else _ieee_legacy_api())
        yield
