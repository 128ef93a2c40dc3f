"""Per-sample squared norms of ``sum_t a_t g_t^T``: the pure-PyTorch reference of every norm rule.

Shapes (after multiplicity grouping, see :func:`group_rows`):
    A: (B, T, d)   activations of the positions of each sample
    G: (B, T, p)   output gradients of the same positions
The weight gradient of sample ``i`` is ``A_i^T G_i`` (d x p). Two ways to get its squared norm:

* direct: form ``A_i^T G_i`` and square it. ``~ B*T*d*p`` FLOPs, the same as the weight gradient.
* ghost:  ``sum_{t,s} (a_t . a_s)(g_t . g_s)``. ``~ B*T^2*(d+p)`` FLOPs, no d x p tensor at all.

Both are evaluated over chunks of samples so that the transient tensor (the per-sample gradients of
one layer for direct, the Gram matrices for ghost) stays under ``memory_budget`` elements: the engine
never holds ``B x P`` per-sample gradients.
"""
from __future__ import annotations

import torch

# Elements of the largest transient tensor a norm rule may allocate (64 MiB of fp32).
DEFAULT_MEMORY_BUDGET = 1 << 24
_memory_budget = DEFAULT_MEMORY_BUDGET


def set_memory_budget(elements: int) -> None:
    """Bound the transient tensors of the torch norm rules (tests use this to prove the bound)."""
    global _memory_budget
    if elements < 1:
        raise ValueError(f"memory budget must be >= 1 element, got {elements}")
    _memory_budget = int(elements)


def get_memory_budget() -> int:
    return _memory_budget


def group_rows(x: torch.Tensor, multiplicity: int) -> torch.Tensor:
    """(B*K, T, ...) -> (B, K*T, ...): a sample's K rows become K*T positions of one sample."""
    rows = x.shape[0]
    if rows % multiplicity:
        raise ValueError(f"{rows} rows is not a multiple of multiplicity {multiplicity}")
    return x.reshape(rows // multiplicity, multiplicity * x.shape[1], *x.shape[2:])


def direct_cost(T: int, d: int, p: int) -> float:
    """FLOPs per sample of the direct norm (form A^T G, square it)."""
    return 2.0 * T * d * p + d * p


def ghost_cost(T: int, d: int, p: int) -> float:
    """FLOPs per sample of the ghost norm (two Gram matrices and their inner product)."""
    return 2.0 * T * T * (d + p) + T * T


# Machine balance (FLOPs per byte of HBM traffic) at which a Triton norm kernel turns compute
# bound on an H100-class GPU: ~600 TFLOP/s of dense bf16 tensor-core work or ~50 of fp32 FMA, over
# ~3 TB/s.  Only the ratio of the two kernels' modelled times matters.
_BALANCE = {"tensor_core": 200.0, "fma": 17.0}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tile(n: int, widest: int = 64) -> int:
    """The tile the kernels' autotuning prunes to for a dimension of size n: a power of two in
    [32, widest] (`TuningSpace.prune`)."""
    return min(widest, max(32, 1 << max(0, n - 1).bit_length()))


def kernel_cost(method: str, T: int, d: int, p: int, dtype: torch.dtype) -> float:
    """Modelled time of one sample's norm by the Triton kernel `method` ("direct" or "ghost"),
    in FLOP-equivalents: max(FLOPs padded to the kernel's tiles, compulsory HBM bytes x machine
    balance).

    direct: (d x p) output tiles of up to 64, positions streamed in steps of 32.  ghost: the upper
    triangle of (T/bt)^2 tile pairs, each a bt x bt block of both Grams over the padded features.
    Padding is what the FLOP model misses at the small sizes where the choice is close (a 3-channel
    layer fills 3/32 of a tensor-core tile).  Re-reads of A and G across tiles are assumed to hit
    L2, so both kernels move the same compulsory bytes; where both are memory bound they tie and
    direct (no T^2 term) is kept.  A model, not a measurement: no GPU has timed it yet."""
    tensor_core = dtype in (torch.bfloat16, torch.float16)
    balance = _BALANCE["tensor_core" if tensor_core else "fma"]
    traffic = T * (d + p) * torch.empty((), dtype=dtype).element_size()
    if method == "direct":
        bd, bp = _tile(d), _tile(p)
        flops = 2.0 * _cdiv(T, 32) * 32 * _cdiv(d, bd) * bd * _cdiv(p, bp) * bp
    elif method == "ghost":
        bt = _tile(T)
        pairs = _cdiv(T, bt) * (_cdiv(T, bt) + 1) / 2
        flops = pairs * 2.0 * bt * bt * (_cdiv(d, 32) * 32 + _cdiv(p, 32) * 32)
    else:
        raise ValueError(f"unknown norm method {method!r}; expected 'direct' or 'ghost'")
    return max(flops, traffic * balance)


def prefer_ghost(T: int, d: int, p: int, kernel_dtype: torch.dtype | None = None) -> bool:
    """The cost model, ``T`` including the multiplicity K.  For the torch backend
    (``kernel_dtype=None``) ghost when it does fewer FLOPs; for the Triton kernels on inputs of
    ``kernel_dtype``, the modelled kernel times (:func:`kernel_cost`)."""
    if kernel_dtype is None:
        return ghost_cost(T, d, p) < direct_cost(T, d, p)
    return kernel_cost("ghost", T, d, p, kernel_dtype) < kernel_cost("direct", T, d, p, kernel_dtype)


def _chunks(n: int, per_sample: int):
    step = max(1, _memory_budget // max(1, per_sample))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def to_acc(x: torch.Tensor) -> torch.Tensor:
    """Low-precision tensors are summed in fp32 (fp64 stays fp64)."""
    return x.to(_acc_dtype(x))


def direct_norm_sq(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """A: (B, T, d), G: (B, T, p) -> (B,) ``||A_i^T G_i||_F^2`` by forming A_i^T G_i chunk by chunk."""
    B, _, d = A.shape
    p = G.shape[-1]
    acc = _acc_dtype(A)
    out = torch.empty(B, dtype=acc, device=A.device)
    for sl in _chunks(B, d * p):
        grads = torch.bmm(A[sl].transpose(1, 2).to(acc), G[sl].to(acc))
        out[sl] = grads.square().sum(dim=(1, 2))
    return out


def ghost_norm_sq(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """A: (B, T, d), G: (B, T, p) -> (B,) ``sum_{t,s} (a_t.a_s)(g_t.g_s)`` chunk by chunk, in fp64.

    The double sum cancels when a sample's per-position gradients nearly cancel: its rounding error is
    about eps * (sum_t |a_t| |g_t|)^2, not eps * norm^2. In fp32 that under-estimated a norm enough to
    release 1.53 max_grad_norm for one sample (tests/test_privacy_hardening.py), so the Gram products
    are formed in fp64 (the direct norm squares the formed gradient and has no such cancellation)."""
    B, T, _ = A.shape
    out = torch.empty(B, dtype=torch.float64, device=A.device)
    for sl in _chunks(B, 2 * T * T):
        a = A[sl].double()
        g = G[sl].double()
        out[sl] = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum(dim=(1, 2))
    return out.to(_acc_dtype(A))


def linear_norm_sq(A: torch.Tensor, G: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Per-sample squared norm of the weight gradient of a linear map; ``method``: auto|direct|ghost."""
    T, d, p = A.shape[1], A.shape[2], G.shape[2]
    if method == "auto":
        method = "ghost" if prefer_ghost(T, d, p) else "direct"
    if method == "ghost":
        return ghost_norm_sq(A, G)
    if method == "direct":
        return direct_norm_sq(A, G)
    raise ValueError(f"unknown norm method {method!r}; expected 'auto', 'direct' or 'ghost'")


def per_sample_sum_sq(x: torch.Tensor, multiplicity: int) -> torch.Tensor:
    """x: (B*K, ...) per-row vectors -> (B,) squared norm of each sample's summed vector."""
    acc = _acc_dtype(x)
    grouped = x.reshape(x.shape[0] // multiplicity, multiplicity, -1).to(acc).sum(dim=1)
    return grouped.square().sum(dim=1)
