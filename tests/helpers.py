"""Small skip helpers for tests. They decide when a test runs, never at import: importing a test
module must not query the GPU (that would initialise CUDA in the pytest process)."""

from __future__ import annotations

import functools
import os

import pytest


def require_ext_env() -> bool:
    """CI sets DPFAST_REQUIRE_EXT=1 so that a missing dpfast._C fails instead of skipping."""
    return os.environ.get("DPFAST_REQUIRE_EXT", "") == "1"


def _skip_unless(reason_fn, *marks):
    """Decorator: call reason_fn() when the test runs; skip (or fail) with the reason it returns."""

    def decorate(fn):
        @functools.wraps(fn)  # keeps the signature, so fixtures and parametrize still work
        def wrapper(*args, **kwargs):
            reason = reason_fn()
            if reason:
                pytest.skip(reason)
            return fn(*args, **kwargs)

        for mark in marks:
            wrapper = mark(wrapper)
        return wrapper

    return decorate


def _cuda_reason() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "needs a CUDA GPU"


def _ext_reason() -> str | None:
    from dpfast._ext import ext, import_error

    if ext is not None:
        return None
    if require_ext_env():
        pytest.fail(f"DPFAST_REQUIRE_EXT=1 but dpfast._C is missing: {import_error}")
    return "dpfast._C is not built"


def _cuda_ext_reason() -> str | None:
    reason = _ext_reason() or _cuda_reason()
    if reason:
        return reason
    from dpfast._ext import has_cuda_ext

    return None if has_cuda_ext() else "dpfast._C was built without CUDA"


requires_cuda = _skip_unless(_cuda_reason, pytest.mark.gpu)
requires_ext = _skip_unless(_ext_reason)
requires_cuda_ext = _skip_unless(_cuda_ext_reason, pytest.mark.gpu)


def assert_noise_close(got, want, *, rtol: float = 1e-6, atol: float = 1e-9) -> None:
    """float32 noise from two implementations: equal up to the float32 rounding of float64 values
    whose last bits differ (libm vs numpy vs libdevice). Cheaper to import than torch.testing."""
    import torch

    got, want = got.double().cpu(), want.double().cpu()
    assert got.shape == want.shape, f"shapes {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs()
    bad = err > atol + rtol * want.abs()
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise AssertionError(f"{int(bad.sum())} mismatches; first at {i}: {got[i].item()} vs {want[i].item()}")
