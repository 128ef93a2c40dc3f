"""Counter-based randomness of DP-SGD: the Philox4x32-10 noise and Poisson streams (the spec).

This pure numpy/PyTorch module is the reference of the contract implemented in C++/CUDA by
``csrc/philox.h``; ``dpfast.finalize`` uses the compiled version when it is built. Everything here
is a pure function of ``(seed, step, index)``: the noise added to a parameter coordinate and the
batch membership of a sample never depend on tensor layout, launch shape or the number of ranks,
so runs are reproducible and a resumed run draws exactly the noise it would have drawn.

Contract (shared with csrc/philox.h; tests/test_random.py pins both):

* Philox4x32-10 with the Random123 round function and constants
  (``M0=0xD2511F53, M1=0xCD9E8D57, W0=0x9E3779B9, W1=0xBB67AE85``, key bumped between rounds).
* ``key = (seed & 0xffffffff, seed >> 32)`` for a seed in ``[0, 2**64)``.
* ``counter = (b & 0xffffffff, b >> 32, step, stream)`` for block ``b`` in ``[0, 2**64)`` and
  ``step`` in ``[0, 2**32)``; streams ``STREAM_NOISE = 0``, ``STREAM_POISSON = 1``,
  ``STREAM_AUX = 2`` (reserved).
* uniforms ``u_k = (x_k + 0.5) * 2**-32`` in float64, strictly inside (0, 1).
* Gaussian noise of global element ``e``: block ``e // 4``, lane ``e % 4``, Box-Muller in float64:
  ``z0, z1 = r cos(2 pi u1), r sin(2 pi u1)`` with ``r = sqrt(-2 ln u0)``; ``z2, z3`` likewise
  from ``u2, u3``.
* Poisson membership of sample ``j`` at step ``s``: ``u0`` of block ``j`` on ``STREAM_POISSON``;
  the sample is in the batch iff ``u0 < q``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "STREAM_NOISE",
    "STREAM_POISSON",
    "STREAM_AUX",
    "philox4x32",
    "philox_blocks",
    "uniforms",
    "normal",
    "normal_f64",
    "poisson_uniforms",
    "poisson_mask",
]

STREAM_NOISE = 0
STREAM_POISSON = 1
STREAM_AUX = 2

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_TWO_PI = 2.0 * math.pi
_TWO_POW_MINUS_32 = 2.0**-32


def check_seed_step(seed: int, step: int) -> tuple[int, int]:
    """Validate ``seed`` in [0, 2**64) and ``step`` in [0, 2**32); returns them as ints."""
    seed, step = int(seed), int(step)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if not 0 <= step < 2**32:
        raise ValueError(f"step must be in [0, 2**32), got {step}")
    return seed, step


def philox4x32(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Philox4x32-10 of each counter row.

    counter: (n, 4) uint32; key: (2,) uint32. Returns (n, 4) uint32.
    Products are formed in uint64, where 32x32-bit multiplications are exact.
    """
    counter = np.asarray(counter)
    if counter.ndim != 2 or counter.shape[1] != 4:
        raise ValueError(f"counter must have shape (n, 4), got {counter.shape}")
    key = np.asarray(key)
    if key.shape != (2,):
        raise ValueError(f"key must have shape (2,), got {key.shape}")
    c = counter.astype(np.uint64)
    return _philox_words(c[:, 0], c[:, 1], c[:, 2], c[:, 3], int(key[0]), int(key[1]))


def _philox_words(c0, c1, c2, c3, k0: int, k1: int) -> np.ndarray:
    """Rounds on four uint64 word arrays (values < 2**32); returns (n, 4) uint32."""
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    for r in range(PHILOX_ROUNDS):
        if r > 0:
            k0 = (k0 + PHILOX_W0) & 0xFFFFFFFF
            k1 = (k1 + PHILOX_W1) & 0xFFFFFFFF
        p0 = m0 * c0
        p1 = m1 * c2
        c0, c1, c2, c3 = (
            (p1 >> _SHIFT32) ^ c1 ^ np.uint64(k0),
            p1 & _MASK32,
            (p0 >> _SHIFT32) ^ c3 ^ np.uint64(k1),
            p0 & _MASK32,
        )
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32)


def philox_blocks(blocks: np.ndarray, *, seed: int, step: int, stream: int) -> np.ndarray:
    """Generator output of the given blocks (uint64 array) of ``stream``: (n, 4) uint32."""
    seed, step = check_seed_step(seed, step)
    b = np.asarray(blocks).astype(np.uint64).reshape(-1)
    c2 = np.full_like(b, step)
    c3 = np.full_like(b, int(stream) & 0xFFFFFFFF)
    return _philox_words(b & _MASK32, b >> _SHIFT32, c2, c3, seed & 0xFFFFFFFF, seed >> 32)


def uniforms(x: np.ndarray) -> np.ndarray:
    """uint32 generator words -> float64 uniforms (x + 0.5) * 2**-32, strictly inside (0, 1)."""
    return (x.astype(np.float64) + 0.5) * _TWO_POW_MINUS_32


def normal_f64(n: int, *, seed: int, step: int, offset: int = 0) -> np.ndarray:
    """Elements ``offset .. offset+n-1`` of the Gaussian noise stream as float64 numpy: (n,)."""
    n, offset = int(n), int(offset)
    if n < 0 or offset < 0:
        raise ValueError(f"n and offset must be >= 0, got n={n}, offset={offset}")
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    first, last = offset // 4, (offset + n - 1) // 4
    blocks = np.arange(first, last + 1, dtype=np.uint64)
    u = uniforms(philox_blocks(blocks, seed=seed, step=step, stream=STREAM_NOISE))
    z = np.empty_like(u)
    for a, b in ((0, 1), (2, 3)):  # same operation order as box_muller() in philox.h
        r = np.sqrt(-2.0 * np.log(u[:, a]))
        t = _TWO_PI * u[:, b]
        z[:, a] = r * np.cos(t)
        z[:, b] = r * np.sin(t)
    start = offset - 4 * first
    return z.reshape(-1)[start : start + n]


def normal(
    n: int,
    *,
    seed: int,
    step: int,
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Elements ``offset .. offset+n-1`` of the Gaussian noise stream: (n,) tensor.

    Generated in float64 and rounded once to ``dtype``. Reference speed (numpy, one core).
    """
    z = torch.from_numpy(normal_f64(n, seed=seed, step=step, offset=offset))
    return z.to(device=device, dtype=dtype)


def poisson_uniforms(indices, *, seed: int, step: int) -> np.ndarray:
    """Poisson membership uniforms of the given sample indices (int64 >= 0): float64 (n,)."""
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    idx = np.asarray(indices).reshape(-1)
    if idx.size and idx.min() < 0:
        raise ValueError("sample indices must be >= 0")
    x = philox_blocks(idx.astype(np.uint64), seed=seed, step=step, stream=STREAM_POISSON)
    return uniforms(x[:, 0])


def poisson_mask(n: int, q: float, *, seed: int, step: int, index_offset: int = 0) -> torch.Tensor:
    """Poisson sampling of samples ``index_offset .. index_offset+n-1`` at ``step``: (n,) bool.

    Each sample is in the batch independently with probability ``q``. A rank that owns a shard of
    the data set passes the shard's first global index as ``index_offset``; the union over ranks is
    then exactly the single-process batch.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    if n < 0 or index_offset < 0:
        raise ValueError(f"n and index_offset must be >= 0, got n={n}, index_offset={index_offset}")
    idx = np.arange(index_offset, index_offset + n, dtype=np.uint64)
    u = poisson_uniforms(idx, seed=seed, step=step)
    return torch.from_numpy(u < q)
