"""Counter-based randomness of DP-SGD: the Philox4x32-10 noise and Poisson streams (the spec).

This pure numpy/PyTorch module is the reference of the contract implemented in C++/CUDA by
``csrc/philox.h``; ``dpfast.finalize`` uses the compiled version when it is built. Everything here
is a pure function of ``(seed, step, index)``: the noise added to a parameter coordinate and the
batch membership of a sample never depend on tensor layout, launch shape or the number of ranks,
so runs are reproducible (a resume rekeys them: ``PrivacyEngine.key_seed``).

Contract (shared with csrc/philox.h; tests/test_random.py pins both):

* Philox4x32-10 with the Random123 round function and constants
  (``M0=0xD2511F53, M1=0xCD9E8D57, W0=0x9E3779B9, W1=0xBB67AE85``, key bumped between rounds).
* ``key = (seed & 0xffffffff, seed >> 32)`` for a seed in ``[0, 2**64)``.
* ``counter = (b & 0xffffffff, b >> 32, step, stream)`` for block ``b`` in ``[0, 2**64)`` and
  ``step`` in ``[0, 2**32)``; streams ``STREAM_NOISE = 0``, ``STREAM_POISSON = 1``,
  ``STREAM_AUX = 2``: per-record training randomness (:func:`record_generators`).
* Gaussian noise of global element ``e``: block ``e // 2``, lane ``e % 2``. The block's four words
  form two 64-bit words ``w0 = x0 | x1 << 32`` and ``w1 = x2 | x3 << 32``; in float64,
  ``u_r = (float64(w0) + 0.5) * 2**-64`` (round to nearest; exact for ``w0 < 2**52``; in
  ``[2**-65, 1]``), ``t = 2 pi * ((w1 >> 11) * 2**-53)``, ``r = sqrt(-2 ln u_r)`` and
  ``z_{2b} = r cos t``, ``z_{2b+1} = r sin t`` (Box-Muller, one pair per block).
* Poisson membership of sample ``j`` at step ``s``: ``u0 = (x0 + 0.5) * 2**-32`` of block ``j`` on
  ``STREAM_POISSON``; the sample is in the batch iff ``u0 < q`` (so the realised rate exceeds ``q``
  by less than ``2**-32``).

Tails and the residual delta. Box-Muller output is bounded: ``|z| <= sqrt(-2 ln u_min)``. With the
32-bit uniforms of earlier versions (``u_min = 2**-33``) that bound was 6.76; a record whose clipped
gradient lies along one coordinate then shifts that coordinate by ``1/noise_multiplier`` noise
standard deviations, and with probability ``Q(z_max - 1/sigma)`` (``Q`` the standard normal upper
tail) it lands where the output without the record has no support. Over ``T`` Poisson-subsampled
steps this adds ``delta_trunc ~= T * q * Q(z_max - 1/sigma)`` (see ``truncation_delta``) to the
accountant's delta: 1.58e-5 at the demo preset (sigma=0.357, q=0.002133, T=200) with the 32-bit
cap, above its delta of 1e-5. With the 64-bit radius uniform ``u_min = 2**-65``, so
``z_max = 9.49`` and the same preset gives ``delta_trunc = 4.7e-12`` (1.1e-11 per step before
subsampling). This counts only the support mismatch of the idealised truncated Gaussian; the
floating-point granularity of Box-Muller (Jin et al. 2022) is a separate weakness, handled by the
secure generator of ``dpfast.random_secure``.
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
    "max_abs_normal",
    "truncation_delta",
    "record_generators",
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
_TWO_POW_MINUS_53 = 2.0**-53
_TWO_POW_MINUS_64 = 2.0**-64


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
    """uint32 generator words -> float64 uniforms (x + 0.5) * 2**-32, strictly inside (0, 1).

    The Poisson membership uniforms (the noise uses the 64-bit ``radius_uniforms``)."""
    return (x.astype(np.float64) + 0.5) * _TWO_POW_MINUS_32


def words64(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 4) uint32 Philox blocks -> the two uint64 words ``x0 | x1 << 32``, ``x2 | x3 << 32``."""
    x = x.astype(np.uint64)
    return x[:, 0] | (x[:, 1] << _SHIFT32), x[:, 2] | (x[:, 3] << _SHIFT32)


def radius_uniforms(w: np.ndarray) -> np.ndarray:
    """uint64 words -> float64 ``(float64(w) + 0.5) * 2**-64`` in ``[2**-65, 1]``.

    Exact for ``w < 2**52`` (the tail of Box-Muller's radius); above that the conversion rounds to
    nearest, a relative 2**-53 change where ``u`` is at least 1/4096 (``r < 4.08``).
    """
    return (w.astype(np.float64) + 0.5) * _TWO_POW_MINUS_64


def angle_uniforms(w: np.ndarray) -> np.ndarray:
    """uint64 words -> float64 ``(w >> 11) * 2**-53`` in ``[0, 1)``, exact."""
    return (w >> np.uint64(11)).astype(np.float64) * _TWO_POW_MINUS_53


def normal_f64(n: int, *, seed: int, step: int, offset: int = 0) -> np.ndarray:
    """Elements ``offset .. offset+n-1`` of the Gaussian noise stream as float64 numpy: (n,)."""
    n, offset = int(n), int(offset)
    if n < 0 or offset < 0:
        raise ValueError(f"n and offset must be >= 0, got n={n}, offset={offset}")
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    first, last = offset // 2, (offset + n - 1) // 2
    blocks = np.arange(first, last + 1, dtype=np.uint64)
    w0, w1 = words64(philox_blocks(blocks, seed=seed, step=step, stream=STREAM_NOISE))
    # Same operation order as box_muller() in philox.h.
    r = np.sqrt(-2.0 * np.log(radius_uniforms(w0)))
    t = _TWO_PI * angle_uniforms(w1)
    z = np.empty((len(blocks), 2), dtype=np.float64)
    z[:, 0] = r * np.cos(t)
    z[:, 1] = r * np.sin(t)
    start = offset - 2 * first
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


# ---- The bound of Box-Muller's output and the delta it leaves unaccounted -------------------------

U_MIN = 0.5 * _TWO_POW_MINUS_64  # smallest radius uniform: w0 = 0


def max_abs_normal(u_min: float = U_MIN) -> float:
    """Largest ``|z|`` Box-Muller can return when its radius uniform is at least ``u_min``.

    9.4926 for this module's ``u_min = 2**-65``; 6.7637 for the 32-bit ``u_min = 2**-33``.
    """
    return math.sqrt(-2.0 * math.log(u_min))


def _upper_tail(x: float) -> float:
    return 0.5 * math.erfc(x / math.sqrt(2.0))


def truncation_delta(noise_multiplier: float, steps: int, sample_rate: float = 1.0,
                     z_max: float | None = None) -> float:
    """Delta a Gaussian truncated at ``|z| <= z_max`` adds to the accountant's, over ``steps``.

    Add/remove-one adjacency, Poisson sampling at ``sample_rate = q``, and the worst case of the
    support mismatch: the record's clipped gradient has norm ``C`` along one coordinate, so with the
    record that coordinate is shifted by ``s = 1/noise_multiplier`` noise standard deviations and,
    when the record is sampled, lands above ``z_max`` (where the output without the record has no
    density) with probability ``P(z_max - s < Z <= z_max | |Z| <= z_max)``. The privacy loss there
    is infinite; elsewhere it is the Gaussian's, up to the renormalisation ``1/P(|Z| <= z_max)``
    per coordinate, a relative ``2 Q(z_max)`` (1e-20 here) on the accountant's delta. Per step the
    extra delta is ``q`` times that probability; over ``steps`` steps at most their sum (union
    bound), which is what this returns:

        delta_trunc = steps * q * (Phi(z_max) - Phi(z_max - s)) / (1 - 2 Q(z_max))

    Spreading the same norm over ``k`` coordinates gives ``k (Phi(z_max) - Phi(z_max - s/sqrt(k)))``
    ~ ``sqrt(k) s phi(z_max)``, more than the one-coordinate figure only for ``k`` above 1e17 at
    ``z_max = 9.49`` (8e10 at 6.76): the one-coordinate case is the worst for any real model.
    """
    z_max = max_abs_normal() if z_max is None else float(z_max)
    s = 1.0 / float(noise_multiplier)
    q = float(sample_rate)
    lo = max(z_max - s, -z_max)
    # Phi(z_max) - Phi(lo) as a difference of upper tails (no cancellation in the tail).
    mass = (_upper_tail(lo) - _upper_tail(z_max)) / (1.0 - 2.0 * _upper_tail(z_max))
    return int(steps) * q * mass


def record_generators(indices, *, seed: int, step: int, device=None) -> list[torch.Generator]:
    """One ``torch.Generator`` per record, for the training randomness of its rows (diffusion noise,
    noise levels, label dropout, augmentations): record ``j`` at logical step ``s`` is seeded by
    block ``j`` of ``STREAM_AUX``, ``x0 | x1 << 32``.

    Why per record: DP-SGD bounds what one record changes in a step's clipped sum by C, and that holds
    only if every *other* record's term is unchanged. Randomness drawn from one stream in batch
    order is not: adding a record shifts the stream under every record after it, in this step and,
    through the amount consumed, in every later one (an outside review measured the sum move by
    4.6-15.9 C / B at q = 1 with the trainer's old single stream). Keyed by (seed, step, index), a
    record's draws depend on nothing but its key, whatever else is in the batch, its position, the
    physical chunking or the rank. Indices are the private data set's, as for Poisson membership,
    which keys on them the same way. For a neighbour that adds or removes the last record, every
    other record keeps its draws, even for an adversary who knows the key. Removing a record from
    the middle shifts the later indices, and with them their draws (as it shifts their Poisson
    coins): then the argument needs the key to be secret, since the later records' draws are a
    permutation of i.i.d. draws, which leaves the distribution of the release unchanged. So the key
    is the engine's secret seed (``PrivacyEngine.record_seed``; in secure mode, derived from the
    secure key, which is never written to a checkpoint).
    A CPU generator keeps 32 bits of its seed; two records may then share draws, which costs nothing
    in privacy (each record's draws are still a function of its own key only)."""
    seed, step = check_seed_step(seed, step)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and idx.min() < 0:
        raise ValueError(f"record indices must be >= 0, got {int(idx.min())}")
    words = philox_blocks(idx.astype(np.uint64), seed=seed, step=step, stream=STREAM_AUX).astype(np.uint64)
    out = []
    for w in words:
        g = torch.Generator(device=device)
        g.manual_seed(int(w[0] | (w[1] << np.uint64(32))))
        out.append(g)
    return out
