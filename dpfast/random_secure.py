"""Secure noise: a ChaCha20 counter-based generator and an exact discrete Gaussian (the spec).

The pure Python reference of the contract implemented in C++/CUDA by ``csrc/chacha20.h`` (read its
header comment for the exact word-by-word algorithm); ``dpfast.finalize.finalize_(...,
generator="chacha20", key=...)`` uses the compiled version when it is built.

Why. The default noise (``dpfast.random``, Philox + Box-Muller in float64) is a statistical
generator whose seed must stay secret, and a floating-point sample ``acc + noise_std * z`` is open
to the attacks of Jin et al. 2022 (after Mironov 2012): the set of floating-point values such a sum
can take depends on ``acc``, so some outputs are possible for one neighbour and impossible for the
other, whatever the noise scale. This module replaces both parts:

* Generator: ChaCha20 (RFC 8439 block function) under a 256-bit key from ``os.urandom``, used as a
  counter-based generator: element ``e`` at step ``s`` reads blocks ``(e, s, stream, j)``,
  ``j = 0, 1, ...``, so its noise depends only on ``(key, step, e)``, as with Philox. Without the
  key the noise is unpredictable (to the extent ChaCha20 is a PRF).
* Sampler: no floating point at all. The clipped sum is put on the grid ``g = 2**grid_exp``
  (``a = rint(acc / g)``, exact), the noise is an integer ``k ~ N_Z(0, S**2)`` drawn exactly with
  integer arithmetic (Canonne, Kamath, Steinke 2020, Algorithms 1-3, with ``S`` an integer), and
  the release is ``float32(((a + k) * g) * scale)``. For every input the released integer
  ``a + k`` has exactly the pmf ``N_Z(a, S**2)`` (conditioned on ``|k| < 2**36``, a mass below
  ``exp(-2**21)``): the attack's lever, a support or a rounding that depends on the data, is gone;
  everything after ``a + k`` is a fixed function of that integer (post-processing).

Grid. ``g = 2**(floor(log2(noise_std)) - grid_bits)`` and ``S = ceil(noise_std / g)``, so ``S`` is
in ``[2**grid_bits, 2**(grid_bits+1)]`` and the noise standard deviation actually added,
``S * g``, is at least ``noise_std`` (above it by less than ``2**-grid_bits`` relative).

Privacy accounting (what is and is not guaranteed). Rounding moves each coordinate by at most
``g/2``, so between neighbours the integer vector ``a`` moves by at most
``Delta = C/g + sqrt(d)`` in L2 (``C`` = max_grad_norm, ``d`` = number of noised coordinates).

* Proven per step (CKS 2020, the multivariate discrete Gaussian): Renyi divergence
  ``<= alpha * Delta**2 / (2 S**2)`` for every order alpha, the curve of the continuous Gaussian
  with noise multiplier ``sigma_eff = S / Delta = S g / (C + sqrt(d) g)``
  (``secure_noise_multiplier``). With ``grid_bits = 20`` that is ``sigma / (1 + sqrt(d) sigma
  2**-20)`` or better: 0.13% below ``sigma`` for a 1.75M-parameter model at sigma = 1.
* Poisson subsampling and composition: account the run as the subsampled Gaussian mechanism at
  ``sigma_eff`` (what dpfast's accountants compute for the continuous Gaussian). For integer
  orders the add direction of the subsampled discrete Gaussian's RDP is bounded by the same
  binomial sum as the continuous one (binomial theorem, and the bound above term by term); the
  remove direction, which Mironov et al. 2019 prove smaller for the continuous Gaussian, and the
  PRV accountant's tight delta(epsilon), are *not* proven here for the discrete Gaussian. At
  ``S >= 2**20`` lattice points per standard deviation the two are numerically indistinguishable,
  but a fully proven bound needs the general Poisson-subsampled RDP bound of Zhu and Wang (ICML
  2019), which holds for any mechanism with the RDP curve above, at some cost in epsilon.
* Not covered: timing. A sample's running time depends on its rejections (hence weakly on ``|k|``,
  Jin et al.'s timing attack), never on ``acc``; a finalize call exposes only the total over all
  its coordinates. The fp32 accumulation of the clipped sum before finalize is the engine's.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

__all__ = [
    "KEY_BYTES",
    "STREAM_NOISE",
    "STREAM_POISSON",
    "new_key",
    "check_key",
    "chacha20_block",
    "chacha20_blocks",
    "secure_grid",
    "secure_noise_multiplier",
    "nominal_noise_multiplier",
    "discrete_gaussian",
    "secure_finalize_values",
    "poisson_mask_secure",
]

KEY_BYTES = 32
STREAM_NOISE = 0
STREAM_POISSON = 1
MAX_SCALE_BITS = 25          # S <= 2**25 keeps every product inside 128 bits (chacha20.h)
MAX_NOISE = 1 << 36          # |k| < 2**36
MAX_DATA = 1 << 52           # |a| <= 2**52
DEFAULT_GRID_BITS = 20

_SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"
_M32 = 0xFFFFFFFF


def new_key() -> bytes:
    """A fresh 256-bit key from the operating system's CSPRNG."""
    return os.urandom(KEY_BYTES)


def check_key(key) -> bytes:
    """``key`` as 32 bytes, or a one-line ValueError / TypeError."""
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise TypeError(f"key must be 32 bytes (e.g. os.urandom(32)), got {type(key).__name__}")
    key = bytes(key)
    if len(key) != KEY_BYTES:
        raise ValueError(f"key must be 32 bytes, got {len(key)}")
    return key


def _key_words(key: bytes) -> list[int]:
    return [int.from_bytes(key[4 * i : 4 * i + 4], "little") for i in range(8)]


def _rotl(v: int, c: int) -> int:
    return ((v << c) & _M32) | (v >> (32 - c))


def _quarter(x: list[int], a: int, b: int, c: int, d: int) -> None:
    x[a] = (x[a] + x[b]) & _M32; x[d] = _rotl(x[d] ^ x[a], 16)  # noqa: E702
    x[c] = (x[c] + x[d]) & _M32; x[b] = _rotl(x[b] ^ x[c], 12)  # noqa: E702
    x[a] = (x[a] + x[b]) & _M32; x[d] = _rotl(x[d] ^ x[a], 8)  # noqa: E702
    x[c] = (x[c] + x[d]) & _M32; x[b] = _rotl(x[b] ^ x[c], 7)  # noqa: E702


_ROUND = ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
          (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14))


def _block_words(kw: list[int], w12: int, w13: int, w14: int, w15: int) -> list[int]:
    state = [*_SIGMA, *kw, w12 & _M32, w13 & _M32, w14 & _M32, w15 & _M32]
    x = list(state)
    for _ in range(10):
        for q in _ROUND:
            _quarter(x, *q)
    return [(a + b) & _M32 for a, b in zip(x, state)]


def chacha20_block(key: bytes, w12: int, w13: int, w14: int, w15: int) -> list[int]:
    """RFC 8439 ChaCha20 block function, input words 12..15 given: 16 uint32 output words.

    RFC 8439's (block counter, nonce) are words 12 and 13..15; dpfast puts ``(e lo, e hi, step,
    stream << 24 | j)`` there.
    """
    return _block_words(_key_words(check_key(key)), w12, w13, w14, w15)


def chacha20_blocks(key: bytes, w12, w13, w14, w15) -> np.ndarray:
    """Vectorised ``chacha20_block`` over arrays of input words (broadcast): (n, 16) uint32."""
    kw = _key_words(check_key(key))
    cols = np.broadcast_arrays(*(np.asarray(w, dtype=np.uint64) & np.uint64(_M32)
                                 for w in (w12, w13, w14, w15)))
    n = cols[0].reshape(-1).shape[0]
    state = [np.full(n, v, dtype=np.uint32) for v in (*_SIGMA, *kw)]
    state += [c.reshape(-1).astype(np.uint32) for c in cols]
    x = [s.copy() for s in state]

    def rotl(v, c):
        return (v << np.uint32(c)) | (v >> np.uint32(32 - c))

    with np.errstate(over="ignore"):
        for _ in range(10):
            for a, b, c, d in _ROUND:
                x[a] += x[b]; x[d] = rotl(x[d] ^ x[a], 16)  # noqa: E702
                x[c] += x[d]; x[b] = rotl(x[b] ^ x[c], 12)  # noqa: E702
                x[a] += x[b]; x[d] = rotl(x[d] ^ x[a], 8)  # noqa: E702
                x[c] += x[d]; x[b] = rotl(x[b] ^ x[c], 7)  # noqa: E702
        return np.stack([xi + si for xi, si in zip(x, state)], axis=1)


# ---- The discrete Gaussian, word by word as in chacha20.h -------------------------------------


class _Words:
    """The word stream of element ``e``: blocks ``j = 0, 1, ...`` of counter (e, step, stream, j)."""

    __slots__ = ("kw", "e", "step", "stream", "j", "buf", "pos")

    def __init__(self, kw: list[int], e: int, step: int, stream: int = STREAM_NOISE):
        self.kw, self.e, self.step, self.stream = kw, e, step, stream
        self.j, self.buf, self.pos = 0, [], 16

    def next(self) -> int:
        if self.pos == 16:
            self.buf = _block_words(self.kw, self.e & _M32, self.e >> 32, self.step,
                                    (self.stream << 24) | (self.j & 0xFFFFFF))
            self.j += 1
            self.pos = 0
        w = self.buf[self.pos]
        self.pos += 1
        return w


def _uniform_below(s: _Words, m: int) -> int:
    if m <= 1:
        return 0
    bits = (m - 1).bit_length()
    words = (bits + 31) // 32
    mask = (1 << bits) - 1
    while True:
        x = 0
        for i in range(words):
            x |= s.next() << (32 * i)
        x &= mask
        if x < m:
            return x


def _bern_exp_frac(s: _Words, n: int, d: int) -> bool:
    k = 1
    while k < (1 << 24) and _uniform_below(s, d * k) < n:
        k += 1
    return k & 1 == 1


def _bern_exp(s: _Words, n: int, d: int) -> bool:
    whole = n // d
    i = 0
    while i < whole:
        if not _bern_exp_frac(s, 1, 1):
            return False
        i += 1
    return _bern_exp_frac(s, n - whole * d, d)


def _discrete_laplace(s: _Words, t: int) -> int:
    while True:
        u = _uniform_below(s, t)
        if not _bern_exp(s, u, t):
            continue
        v = 0
        while _bern_exp_frac(s, 1, 1):
            v += 1
        x = u + t * v
        negative = s.next() & 1
        if negative and x == 0:
            continue
        return -x if negative else x


def _discrete_gaussian_one(s: _Words, scale_s: int) -> int:
    t = scale_s + 1
    s2 = scale_s * scale_s
    den = 2 * s2 * t * t
    while True:
        y = _discrete_laplace(s, t)
        if abs(y) >= MAX_NOISE:
            continue
        diff = abs(abs(y) * t - s2)
        if _bern_exp(s, diff * diff, den):
            return y


def _check_scale_s(scale_s) -> int:
    scale_s = int(scale_s)
    if not 1 <= scale_s <= 1 << MAX_SCALE_BITS:
        raise ValueError(f"scale_s must be in [1, 2**{MAX_SCALE_BITS}], got {scale_s}")
    return scale_s


def discrete_gaussian(n: int, *, key: bytes, step: int, scale_s: int, offset: int = 0) -> np.ndarray:
    """Elements ``offset .. offset+n-1`` of the secure integer noise stream: (n,) int64.

    Each is ``N_Z(0, scale_s**2)`` (exact; conditioned on ``|k| < 2**36``). Pure Python: about
    10^4 elements per second; tests and the fallback only.
    """
    kw = _key_words(check_key(key))
    scale_s = _check_scale_s(scale_s)
    n, offset, step = int(n), int(offset), int(step)
    if n < 0 or offset < 0:
        raise ValueError(f"n and offset must be >= 0, got n={n}, offset={offset}")
    if not 0 <= step < 2**32:
        raise ValueError(f"step must be in [0, 2**32), got {step}")
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        out[i] = _discrete_gaussian_one(_Words(kw, offset + i, step), scale_s)
    return out


# ---- Grid, finalize values and accounting -------------------------------------------------------


def secure_grid(noise_std: float, grid_bits: int = DEFAULT_GRID_BITS) -> tuple[int, int]:
    """``(scale_s, grid_exp)``: the grid ``g = 2**grid_exp`` and integer noise scale ``S``.

    ``grid_exp = floor(log2(noise_std)) - grid_bits``, ``S = ceil(noise_std / g)``, so that
    ``S * g >= noise_std`` and ``S`` in ``[2**grid_bits, 2**(grid_bits + 1)]``.
    """
    noise_std, grid_bits = float(noise_std), int(grid_bits)
    if not (noise_std > 0.0 and math.isfinite(noise_std)):
        raise ValueError(f"noise_std must be finite and > 0 for the secure grid, got {noise_std}")
    if not 1 <= grid_bits <= MAX_SCALE_BITS - 1:
        raise ValueError(f"grid_bits must be in [1, {MAX_SCALE_BITS - 1}], got {grid_bits}")
    _, ex = math.frexp(noise_std)  # noise_std = m * 2**ex, m in [0.5, 1)
    grid_exp = ex - 1 - grid_bits
    scale_s = math.ceil(math.ldexp(noise_std, -grid_exp))  # exact: a power-of-two scaling
    return int(scale_s), int(grid_exp)


def secure_noise_multiplier(noise_multiplier: float, dim: int, *, max_grad_norm: float = 1.0,
                            grid_bits: int = DEFAULT_GRID_BITS) -> float:
    """The noise multiplier to account a secure release with: ``S g / (C + sqrt(dim) g)``.

    ``dim`` is the number of coordinates finalize noises (all trainable parameters). The grid
    rounding adds up to ``sqrt(dim) g`` to the L2 sensitivity ``C``; ``S g >= noise_std``.
    """
    c = float(max_grad_norm)
    if not (c > 0 and math.isfinite(c)):
        raise ValueError(f"max_grad_norm must be finite and > 0, got {max_grad_norm}")
    if int(dim) < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    scale_s, grid_exp = secure_grid(float(noise_multiplier) * c, grid_bits)
    g = math.ldexp(1.0, grid_exp)
    return scale_s * g / (c + math.sqrt(int(dim)) * g)


def nominal_noise_multiplier(effective: float, dim: int, *, max_grad_norm: float = 1.0,
                             grid_bits: int = DEFAULT_GRID_BITS) -> float:
    """The smallest nominal noise multiplier (on a 0.01% ladder from ``effective`` up) whose
    ``secure_noise_multiplier`` is at least ``effective``: what to ask the secure noise for when the
    accountant must be charged ``effective``."""
    sigma = float(effective)
    while secure_noise_multiplier(sigma, dim, max_grad_norm=max_grad_norm, grid_bits=grid_bits) < effective:
        sigma *= 1.0001
    return sigma


def secure_finalize_values(acc: torch.Tensor, k: np.ndarray, *, grid_exp: int,
                           scale: float) -> torch.Tensor:
    """``float32(((a + k) * 2**grid_exp) * scale)`` with ``a`` = acc on the grid (chacha20.h).

    acc: float32 (n,); k: int64 (n,). NaN where acc is not finite.
    """
    x = acc.detach().cpu().to(torch.float64).numpy()
    finite = np.isfinite(x)
    a = np.clip(np.rint(np.ldexp(np.where(finite, x, 0.0), -grid_exp)), -MAX_DATA, MAX_DATA)
    n = a.astype(np.int64) + k.astype(np.int64)
    out = np.ldexp(n.astype(np.float64), grid_exp) * float(scale)
    out = np.where(finite, out, np.nan)
    return torch.from_numpy(out).to(torch.float32)


def poisson_mask_secure(n: int, q: float, *, key: bytes, step: int, index_offset: int = 0) -> torch.Tensor:
    """Poisson sampling from ChaCha20: (n,) bool, sample ``j`` in iff ``w < floor(q * 2**64)``.

    ``w = x0 | x1 << 32`` of block (j, step, STREAM_POISSON, 0); the realised rate is at most
    ``q`` (never above it, so accounting with ``q`` is conservative). Same signature as
    ``dpfast.random.poisson_mask`` plus the key.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    if n < 0 or index_offset < 0:
        raise ValueError(f"n and index_offset must be >= 0, got n={n}, index_offset={index_offset}")
    if not 0 <= int(step) < 2**32:
        raise ValueError(f"step must be in [0, 2**32), got {step}")
    if n == 0:
        return torch.zeros(0, dtype=torch.bool)
    idx = np.arange(index_offset, index_offset + n, dtype=np.uint64)
    x = chacha20_blocks(key, idx & np.uint64(_M32), idx >> np.uint64(32), int(step),
                        STREAM_POISSON << 24)
    w = x[:, 0].astype(np.uint64) | (x[:, 1].astype(np.uint64) << np.uint64(32))
    threshold = math.floor(math.ldexp(float(q), 64))  # exact: q is dyadic
    if threshold >= 2**64:
        return torch.ones(n, dtype=torch.bool)
    return torch.from_numpy(w < np.uint64(threshold))
