"""Dispatch of the per-sample norm computations to the torch reference or the Triton kernels.

``backend``: "torch" (reference, CPU fast path), "triton" (kernels/, GPU fast path; on CPU tensors it
runs under TRITON_INTERPRET=1, which is how the kernels are tested), "auto" (triton on CUDA tensors
when Triton is importable, torch otherwise).
"""
from __future__ import annotations

import functools

import torch

from . import _norms


@functools.lru_cache(maxsize=1)
def _kernels():
    from .._kernels import load_kernels

    return load_kernels()


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "torch":
        return "torch"
    k = _kernels()
    have = k is not None and getattr(k, "HAS_TRITON", False)
    if backend == "triton":
        if not have:
            raise RuntimeError(
                "backend='triton' needs Triton and dpfast's kernels: `pip install triton` "
                "(on CPU tensors set TRITON_INTERPRET=1), or use backend='torch'")
        return "triton"
    if backend == "auto":
        return "triton" if (have and device.type == "cuda") else "torch"
    raise ValueError(f"backend must be 'torch', 'triton' or 'auto', got {backend!r}")


def linear_weight_norm_sq(A3, G3, K: int, backend: str, method: str) -> torch.Tensor:
    """A3: (B*K, T, d), G3: (B*K, T, p) -> (B,) squared norms of each sample's ``sum g a^T``."""
    T, d, p = K * A3.shape[1], A3.shape[2], G3.shape[2]
    kernel = resolve_backend(backend, A3.device) == "triton" and A3.dtype != torch.float64
    if method == "auto":
        method = "ghost" if _norms.prefer_ghost(T, d, p, A3.dtype if kernel else None) else "direct"
    if kernel:
        k = _kernels()
        fn = k.ops.ghost_norm if method == "ghost" else k.ops.linear_direct_norm
        return fn(A3, G3, K)  # any strides: no copy of a transposed token view
    return _norms.linear_norm_sq(_norms.group_rows(A3, K), _norms.group_rows(G3, K), method)


def conv2d_kernel_applies(x, transposed: bool, kernel_size, backend: str) -> bool:
    """Whether a conv's weight norm runs on the Triton implicit-GEMM kernels (non-transposed 2-D
    convs in fp32/bf16/fp16 on the triton backend); the torch rule handles the rest."""
    return (not transposed and len(kernel_size) == 2 and x.dtype != torch.float64
            and resolve_backend(backend, x.device) == "triton")


def conv2d_weight_norm_sq(x, G, kernel_size, K, stride, padding, dilation, groups, method):
    """Triton implicit-GEMM norm of a conv2d weight where `conv2d_kernel_applies`; ``method``
    already resolved to "direct" or "ghost"."""
    if method not in ("direct", "ghost"):
        raise ValueError(f"conv norm method must be resolved to 'direct' or 'ghost', got {method!r}")
    k = _kernels()
    fn = k.ops.conv2d_ghost_norm if method == "ghost" else k.ops.conv2d_direct_norm
    return fn(x, G, tuple(kernel_size), K, tuple(stride), tuple(padding), tuple(dilation), groups)


def conv2d_per_sample_grads(x, G, kernel_size, K, stride, padding, dilation, groups):
    """Each sample's conv2d weight gradient, fp32 (B, *weight.shape), by the Triton implicit-GEMM
    kernel where `conv2d_kernel_applies`."""
    return _kernels().ops.conv2d_per_sample_grads(x, G, tuple(kernel_size), K, tuple(stride), tuple(padding),
                                                  tuple(dilation), groups)


_HALF = (torch.bfloat16, torch.float16)


def _per_sample(row_scale, K):
    # the optimizer's row scale is a per-sample factor repeated over the sample's K rows
    return row_scale.reshape(-1, K)[:, 0]


def linear_clipped_wgrad(A3, G3, row_scale, K, backend):
    """sum_r s[r] G_r^T A_r in fp32 by the fused Triton kernel where it is the fast exact path
    (bf16/fp16 inputs on the triton backend); None where the torch rule computes it in fp32."""
    if A3.dtype not in _HALF or resolve_backend(backend, A3.device) != "triton":
        return None
    return _kernels().ops.linear_clipped_wgrad(A3, G3, _per_sample(row_scale, K), K)


def conv2d_clipped_wgrad(x, G, row_scale, K, kernel_size, stride, padding, dilation, groups, backend):
    """The conv analogue of `linear_clipped_wgrad` for non-transposed 2-D convs; None otherwise."""
    if x.dtype not in _HALF or len(kernel_size) != 2 or resolve_backend(backend, x.device) != "triton":
        return None
    return _kernels().ops.conv2d_clipped_wgrad(x, G, _per_sample(row_scale, K), tuple(kernel_size), K,
                                               tuple(stride), tuple(padding), tuple(dilation), groups)
