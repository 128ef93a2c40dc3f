"""Fused DP-SGD finalize: add Gaussian noise to every clipped gradient sum and scale, in one pass.

For parameter tensors with fp32 accumulators ``acc_p`` (the sum over the batch of clipped
per-sample gradients) and global element offsets ``off_p`` (index of the tensor's first element in
the concatenation of all parameters, in a fixed order), the released gradient is

    out_p[j] = float32((float64(acc_p[j]) + noise_std * z(off_p + j)) * scale)

with ``z`` the Philox Gaussian stream of ``dpfast.random`` for ``(seed, step)``,
``noise_std = noise_multiplier * max_grad_norm`` and ``scale = 1 / B_expected``. The noise of a
coordinate depends only on ``(seed, step, global index)``, so splitting or reordering tensors with
the same offsets, or switching between CPU, CUDA and the reference, gives the same result
(to float32 rounding of the last place of libm vs libdevice).

Secure mode, ``finalize_(..., generator="chacha20", key=key)``: the noise is an exact discrete
Gaussian from ChaCha20 under a 256-bit key, added to the clipped sum on a power-of-two grid, with
no floating point between data and noise (``dpfast.random_secure``, ``csrc/chacha20.h``):

    out_p[j] = float32(((a + k(off_p + j)) * g) * scale),   a = rint(acc_p[j] / g)

with ``(S, log2 g) = dpfast.random_secure.secure_grid(noise_std, grid_bits)`` and
``k ~ N_Z(0, S**2)``. Account it at ``dpfast.random_secure.secure_noise_multiplier(...)``.
CPU, CUDA and the reference give bitwise the same output (integer arithmetic, one rounding).

Layers: ``dpfast._C.finalize_cpu`` / ``finalize_cuda`` / ``finalize_secure_cpu`` /
``finalize_secure_cuda`` (csrc/) -> ``finalize_`` (checks and dispatch) ; ``finalize_ref`` is the
pure PyTorch spec used by tests and without the extension.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from dpfast import random as dprandom
from dpfast import random_secure as dpsecure
from dpfast._ext import ext, has_cuda_ext

__all__ = ["finalize_", "finalize_ref", "gaussian_noise", "default_offsets", "GENERATORS"]

GENERATORS = ("philox", "chacha20")

_warned_cuda_fallback = False
_warned_secure_fallback = False


def default_offsets(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Global offsets of tensors laid end to end in the given order (running sum of numels)."""
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += t.numel()
    return offsets


def _check_args(accs, outs, offsets, *, noise_std, scale, seed, step, generator="philox"):
    """Validate a finalize call; returns (offsets, device or None when empty).

    Errors name the offending tensor index.
    """
    accs, outs = list(accs), list(outs)
    if len(accs) != len(outs):
        raise ValueError(f"accs and outs must have the same length, got {len(accs)}, {len(outs)}")
    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")
    if generator == "philox" and seed is None:
        raise ValueError("seed is required with generator='philox'")
    dprandom.check_seed_step(0 if seed is None else seed, step)
    noise_std, scale = float(noise_std), float(scale)
    if not (noise_std >= 0.0 and noise_std != float("inf")):
        raise ValueError(f"noise_std must be finite and >= 0, got {noise_std}")
    if scale != scale or abs(scale) == float("inf"):
        raise ValueError(f"scale must be finite, got {scale}")
    device = accs[0].device if accs and isinstance(accs[0], torch.Tensor) else None
    for i, (a, o) in enumerate(zip(accs, outs)):
        for name, t in (("accs", a), ("outs", o)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != torch.float32:
                raise ValueError(f"{name}[{i}] must be float32, got {t.dtype}")
            if not t.is_contiguous():
                raise ValueError(f"{name}[{i}] must be contiguous")
            if t.device != device:
                raise ValueError(f"{name}[{i}] is on {t.device}, expected {device} (as accs[0])")
        if a.numel() != o.numel():
            raise ValueError(f"accs[{i}] has {a.numel()} elements but outs[{i}] has {o.numel()}")
    if offsets is None:
        offsets = default_offsets(accs)
    else:
        offsets = [int(x) for x in offsets]
        if len(offsets) != len(accs):
            raise ValueError(
                f"offsets must have one entry per tensor, got {len(offsets)} for {len(accs)}")
        for i, off in enumerate(offsets):
            if off < 0:
                raise ValueError(f"offsets[{i}] must be >= 0, got {off}")
        # Overlapping ranges would give two coordinates the same noise draw: a privacy bug.
        spans = sorted((off, off + a.numel(), i)
                       for i, (off, a) in enumerate(zip(offsets, accs)) if a.numel())
        for (s0, e0, i0), (s1, _, i1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise ValueError(
                    f"offsets[{i1}]={s1} overlaps tensor {i0} (elements {s0}..{e0 - 1}): "
                    "overlapping tensors would receive identical noise"
                )
    return offsets, device


def _bump_versions(outs: Sequence[torch.Tensor]) -> None:
    # The compiled kernels write through raw pointers; tell autograd the outputs changed.
    bump = getattr(torch.autograd.graph, "increment_version", None)
    if bump is not None and outs:
        bump(list(outs))


def _pointers(accs, outs):
    """(acc_ptrs, out_ptrs, numels) for the torch-free binding of dpfast._C."""
    return [a.data_ptr() for a in accs], [o.data_ptr() for o in outs], [a.numel() for a in accs]


def _finalize_ref_impl(accs, outs, offsets, *, noise_std, scale, seed, step) -> None:
    with torch.no_grad():
        for a, o, off in zip(accs, outs, offsets):
            if a.numel() == 0:
                continue
            acc64 = a.to(torch.float64)
            if noise_std != 0.0:
                z = dprandom.normal(a.numel(), seed=seed, step=step, offset=off,
                                    dtype=torch.float64, device=a.device)
                acc64 = acc64 + noise_std * z.view_as(acc64)
            o.copy_(acc64 * scale)  # one rounding to float32, as in the kernels


def _secure_args(key, noise_std, grid_bits):
    """(key bytes, S, grid_exp) of a secure call; a fresh OS key when ``key`` is None."""
    key = dpsecure.new_key() if key is None else dpsecure.check_key(key)
    if noise_std == 0.0:
        if not 1 <= int(grid_bits) <= dpsecure.MAX_SCALE_BITS - 1:
            raise ValueError(f"grid_bits must be in [1, {dpsecure.MAX_SCALE_BITS - 1}], got {grid_bits}")
        return key, None, None
    scale_s, grid_exp = dpsecure.secure_grid(noise_std, grid_bits)
    return key, scale_s, grid_exp


def _finalize_secure_ref_impl(accs, outs, offsets, *, key, scale_s, grid_exp, scale, step) -> None:
    with torch.no_grad():
        for a, o, off in zip(accs, outs, offsets):
            if a.numel() == 0:
                continue
            k = dpsecure.discrete_gaussian(a.numel(), key=key, step=step, scale_s=scale_s, offset=off)
            v = dpsecure.secure_finalize_values(a.reshape(-1), k, grid_exp=grid_exp, scale=scale)
            o.copy_(v.view_as(o))


def finalize_ref(
    accs: Sequence[torch.Tensor],
    outs: Sequence[torch.Tensor],
    *,
    noise_std: float,
    scale: float,
    seed: int | None = None,
    step: int,
    offsets: Sequence[int] | None = None,
    generator: str = "philox",
    key: bytes | None = None,
    grid_bits: int = dpsecure.DEFAULT_GRID_BITS,
) -> None:
    """Pure PyTorch/numpy reference of ``finalize_`` (the spec): same arguments, same result."""
    offsets, _ = _check_args(accs, outs, offsets, noise_std=noise_std, scale=scale, seed=seed,
                             step=step, generator=generator)
    if generator == "chacha20":
        key, scale_s, grid_exp = _secure_args(key, float(noise_std), grid_bits)
        if scale_s is not None:
            _finalize_secure_ref_impl(list(accs), list(outs), offsets, key=key, scale_s=scale_s,
                                      grid_exp=grid_exp, scale=float(scale), step=int(step))
            return
    _finalize_ref_impl(accs, outs, offsets, noise_std=float(noise_std), scale=float(scale),
                       seed=0 if seed is None else int(seed), step=int(step))


def _warn_no_cuda_kernels() -> None:
    global _warned_cuda_fallback
    if not _warned_cuda_fallback:
        _warned_cuda_fallback = True
        warnings.warn(
            "dpfast._C has no CUDA kernels: finalize_ generates the noise on the CPU with the "
            "reference and copies it to the GPU, which is slow. Rebuild dpfast where nvcc exists.",
            RuntimeWarning,
            stacklevel=3,
        )


def _warn_no_secure_kernels(device) -> None:
    global _warned_secure_fallback
    if not _warned_secure_fallback:
        _warned_secure_fallback = True
        warnings.warn(
            f"dpfast._C has no secure finalize for {device.type} tensors: the discrete Gaussian is "
            "drawn by the pure Python reference (about 10^4 elements/s). Rebuild dpfast "
            "(`pip install .`, with nvcc for CUDA).",
            RuntimeWarning,
            stacklevel=3,
        )


def _finalize_secure(accs, outs, offsets, device, *, key, scale_s, grid_exp, scale, step):
    args = (key, scale_s, grid_exp, scale, step)
    if device.type == "cuda" and has_cuda_ext():
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            ext.finalize_secure_cuda(*_pointers(accs, outs), offsets, *args, stream)
        _bump_versions(outs)
    elif device.type == "cpu" and ext is not None:
        ext.finalize_secure_cpu(*_pointers(accs, outs), offsets, *args)
        _bump_versions(outs)
    else:
        _warn_no_secure_kernels(device)
        _finalize_secure_ref_impl(accs, outs, offsets, key=key, scale_s=scale_s, grid_exp=grid_exp,
                                  scale=scale, step=step)


def finalize_(
    accs: Sequence[torch.Tensor],
    outs: Sequence[torch.Tensor],
    *,
    noise_std: float,
    scale: float,
    seed: int | None = None,
    step: int,
    offsets: Sequence[int] | None = None,
    generator: str = "philox",
    key: bytes | None = None,
    grid_bits: int = dpsecure.DEFAULT_GRID_BITS,
) -> None:
    """``outs[p] = (accs[p] + noise_std * z(offsets[p] + j)) * scale`` for every tensor, in place.

    accs, outs: fp32 contiguous tensors on one device, ``outs[p].numel() == accs[p].numel()``;
    ``outs[p]`` may be ``accs[p]``. offsets: global element offset of each tensor (default: the
    running sum of numels in list order); ranges must not overlap. ``noise_std == 0`` skips noise
    generation entirely. CUDA tensors run one kernel launch on the current stream.

    generator: ``"philox"`` (default; ``seed`` required) or ``"chacha20"``, the secure mode:
    exact discrete Gaussian noise from ChaCha20 under ``key`` (32 bytes; ``None`` draws a fresh one
    from ``os.urandom`` for this call alone), on the grid chosen by ``grid_bits`` (see the module
    docstring and ``dpfast.random_secure``; ``seed`` is ignored). Never reuse a ``(key, step)``
    pair for two releases.
    """
    offsets, device = _check_args(accs, outs, offsets, noise_std=noise_std, scale=scale, seed=seed,
                                  step=step, generator=generator)
    if generator == "chacha20":
        key, scale_s, grid_exp = _secure_args(key, float(noise_std), grid_bits)  # checks first
        if device is None:
            return
        if scale_s is not None:
            _finalize_secure(list(accs), list(outs), offsets, device, key=key, scale_s=scale_s,
                             grid_exp=grid_exp, scale=float(scale), step=int(step))
            return
        seed = 0  # noise_std == 0: the plain scaling below, no generator
    if device is None:
        return
    # Same order as the scalar arguments of the dpfast._C bindings.
    kw = dict(noise_std=float(noise_std), scale=float(scale), seed=int(seed), step=int(step))
    accs, outs = list(accs), list(outs)
    if device.type == "cuda" and has_cuda_ext():
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            ext.finalize_cuda(*_pointers(accs, outs), offsets, *kw.values(), stream)
        _bump_versions(outs)
    elif device.type == "cpu" and ext is not None:
        ext.finalize_cpu(*_pointers(accs, outs), offsets, *kw.values())
        _bump_versions(outs)
    else:  # no extension, a CUDA-less extension, or another accelerator: the reference
        if device.type != "cpu":
            _warn_no_cuda_kernels()
        _finalize_ref_impl(accs, outs, offsets, **kw)


def gaussian_noise(
    n: int,
    *,
    seed: int,
    step: int,
    offset: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Elements ``offset .. offset+n-1`` of the noise stream: (n,) tensor, compiled when possible.

    The compiled kernels round to float32; for float64 (or without ``dpfast._C``) this uses the
    float64 reference ``dpfast.random.normal``.
    """
    seed, step = dprandom.check_seed_step(seed, step)
    device = torch.device(device)
    if n < 0 or offset < 0:
        raise ValueError(f"n and offset must be >= 0, got n={n}, offset={offset}")
    if dtype == torch.float32:
        if device.type == "cuda" and has_cuda_ext():
            out = torch.empty(n, dtype=torch.float32, device=device)
            with torch.cuda.device(device):
                stream = torch.cuda.current_stream(device).cuda_stream
                ext.normal_cuda(out.data_ptr(), n, offset, seed, step, stream)
            return out
        if ext is not None:
            out = torch.empty(n, dtype=torch.float32)
            ext.normal_cpu(out.data_ptr(), n, offset, seed, step)
            return out.to(device)
    return dprandom.normal(n, seed=seed, step=step, offset=offset, dtype=dtype, device=device)
