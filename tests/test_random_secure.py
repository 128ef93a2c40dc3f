"""dpfast.random_secure (ChaCha20 and the exact discrete Gaussian: the spec) and its twin in dpfast._C.

Statistical tests use fixed keys and bounds whose false-failure probability under a correct sampler
is stated next to them (each < 1e-8).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import requires_ext

from dpfast import random_secure as S

RFC_KEY = bytes(range(32))  # RFC 8439 section 2.3.2: 00:01:02:...:1f
KEY = bytes.fromhex("5a" * 16 + "c3" * 16)
SIX_SIGMA = 6.0  # P(|N(0,1)| > 6) = 1.97e-9


def _ext():
    from dpfast._ext import ext

    return ext


# RFC 8439 2.3.2: counter 1, nonce 00:00:00:09:00:00:00:4a:00:00:00:00 -> the state after 20 rounds
# plus the input ("ChaCha State at the End of the ChaCha20 Operation").
RFC_232_INPUT = (1, 0x09000000, 0x4A000000, 0)
RFC_232_OUTPUT = [0xE4E7F110, 0x15593BD1, 0x1FDD0F50, 0xC47120A3, 0xC7F4D1C7, 0x0368C033,
                  0x9AAA2204, 0x4E6CD4C3, 0x466482D2, 0x09AA9F07, 0x05D7C214, 0xA2028BD9,
                  0xD19C12B5, 0xB94E16DE, 0xE883D0CB, 0x4E3C50A2]


def test_quarter_round_rfc8439_2_1_1():
    x = [0x11111111, 0x01020304, 0x9B8D6F43, 0x01234567]
    S._quarter(x, 0, 1, 2, 3)
    assert x == [0xEA2A92F4, 0xCB1CF8CE, 0x4581472E, 0x5881C4BB]


def test_block_function_rfc8439_2_3_2_reference():
    assert S.chacha20_block(RFC_KEY, *RFC_232_INPUT) == RFC_232_OUTPUT


def test_block_function_rfc8439_a1_zero_key():
    # Appendix A.1 test vector #1: keystream 76 b8 e0 ad a0 f1 3d 90 ...
    assert S.chacha20_block(bytes(32), 0, 0, 0, 0)[:2] == [0xADE0B876, 0x903DF1A0]


@requires_ext
def test_block_function_rfc8439_2_3_2_ext():
    assert list(_ext().chacha20_block(RFC_KEY, *RFC_232_INPUT)) == RFC_232_OUTPUT
    assert list(_ext().chacha20_block(KEY, 7, 2**32 - 1, 9, 1 << 24)) == S.chacha20_block(
        KEY, 7, 2**32 - 1, 9, 1 << 24)


def test_vectorised_blocks_match_the_scalar_function():
    w12 = np.array([0, 1, 2**32 - 1, 12345])
    got = S.chacha20_blocks(KEY, w12, 3, 2**31, 5)
    assert got.dtype == np.uint32 and got.shape == (4, 16)
    for row, c in zip(got, w12):
        assert row.tolist() == S.chacha20_block(KEY, int(c), 3, 2**31, 5)


def test_word_stream_is_the_counter_layout():
    # Element e at step s reads block j as words 12..15 = (e lo, e hi, s, stream << 24 | j).
    e, step = (5 << 32) | 17, 9
    w = S._Words(S._key_words(KEY), e, step)
    words = [w.next() for _ in range(20)]
    assert words[:16] == S.chacha20_block(KEY, 17, 5, step, 0)
    assert words[16:] == S.chacha20_block(KEY, 17, 5, step, 1)[:4]


@pytest.mark.parametrize("bad,exc,match", [(b"x" * 31, ValueError, "32 bytes, got 31"),
                                           (b"x" * 33, ValueError, "32 bytes, got 33"),
                                           ("x" * 32, TypeError, "key must be 32 bytes"),
                                           (None, TypeError, "key must be 32 bytes")])
def test_bad_keys_are_refused(bad, exc, match):
    with pytest.raises(exc, match=match):
        S.discrete_gaussian(1, key=bad, step=0, scale_s=4)


@requires_ext
def test_bad_keys_are_refused_by_the_ext():
    out = torch.empty(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="key must be 32 bytes, got 16"):
        _ext().discrete_gaussian_cpu(out.data_ptr(), 2, 0, b"k" * 16, 4, 0)
    with pytest.raises(ValueError, match="scale_s"):
        _ext().discrete_gaussian_cpu(out.data_ptr(), 2, 0, KEY, 0, 0)
    with pytest.raises(ValueError, match="scale_s"):
        _ext().discrete_gaussian_cpu(out.data_ptr(), 2, 0, KEY, 2**25 + 1, 0)
    with pytest.raises(ValueError, match="step"):
        _ext().discrete_gaussian_cpu(out.data_ptr(), 2, 0, KEY, 4, 2**32)


def test_new_key_is_random_bytes():
    a, b = S.new_key(), S.new_key()
    assert isinstance(a, bytes) and len(a) == 32 and a != b


@requires_ext
@pytest.mark.parametrize("scale_s,offset,n", [(1, 0, 3000), (3, 2**32 - 5, 700), (2**20, 11, 600),
                                              (2**20 + 12345, 2**40, 300), (2**25, 0, 200)])
def test_ext_discrete_gaussian_matches_reference_exactly(scale_s, offset, n):
    out = torch.empty(n, dtype=torch.int64)
    _ext().discrete_gaussian_cpu(out.data_ptr(), n, offset, KEY, scale_s, 77)
    ref = S.discrete_gaussian(n, key=KEY, step=77, scale_s=scale_s, offset=offset)
    assert np.array_equal(out.numpy(), ref)  # integer arithmetic: bitwise


def _draws(n, scale_s, step=3):
    """n draws from the ext when built (fast), else fewer from the reference."""
    ext = _ext()
    if ext is None:
        n = min(n, 20_000)
        return S.discrete_gaussian(n, key=KEY, step=step, scale_s=scale_s)
    out = torch.empty(n, dtype=torch.int64)
    ext.discrete_gaussian_cpu(out.data_ptr(), n, 0, KEY, scale_s, step)
    return out.numpy()


@pytest.mark.parametrize("scale_s", [1, 3])
def test_small_scale_pmf_is_the_discrete_gaussian(scale_s):
    k = _draws(10**6, scale_s)
    n = len(k)
    support = np.arange(-12 * scale_s, 12 * scale_s + 1)
    w = np.exp(-support.astype(np.float64) ** 2 / (2 * scale_s**2))
    pmf = w / w.sum()  # the mass beyond 12 S is < 1e-31
    counts = np.array([(k == v).sum() for v in support])
    assert counts.sum() == n
    # each count ~ Binomial(n, p); 6-sigma (plus one count of slack for tiny p): a false failure
    # has probability < 2e-9 per value, < 1e-7 over the at most 73 values
    tol = SIX_SIGMA * np.sqrt(n * pmf * (1 - pmf)) + 1
    assert np.all(np.abs(counts - n * pmf) <= tol), np.max(np.abs(counts - n * pmf) / tol)


@pytest.mark.parametrize("scale_s", [2**20, 1_908_409])
def test_large_scale_moments(scale_s):
    k = _draws(10**6, scale_s).astype(np.float64) / scale_s
    n = len(k)
    # Mean ~ N(0, 1/n); variance estimate ~ N(1, 2/n) (kurtosis 3); each bound fails with p < 2e-9.
    assert abs(k.mean()) < SIX_SIGMA / math.sqrt(n)
    assert abs(k.var() - 1.0) < SIX_SIGMA * math.sqrt(2.0 / n)
    p3 = math.erfc(3 / math.sqrt(2))  # tail mass, binomial count, 6-sigma
    assert abs((np.abs(k) > 3).sum() - n * p3) < SIX_SIGMA * math.sqrt(n * p3 * (1 - p3))


def test_secure_grid():
    for noise_std in (1e-6, 0.357, 1.0, 0.91, 3.0, 1234.5):
        for bits in (1, 8, 20, 24):
            scale_s, grid_exp = S.secure_grid(noise_std, bits)
            g = math.ldexp(1.0, grid_exp)
            assert 2**bits <= scale_s <= 2 ** (bits + 1)
            assert noise_std <= scale_s * g < noise_std + g
    for bad in (dict(noise_std=0.0), dict(noise_std=float("nan")), dict(noise_std=1.0, grid_bits=0),
                dict(noise_std=1.0, grid_bits=25)):
        with pytest.raises(ValueError, match="noise_std|grid_bits"):
            S.secure_grid(**bad)


def test_secure_noise_multiplier():
    sigma, c, d = 1.0, 1.0, 1_753_345
    eff = S.secure_noise_multiplier(sigma, d, max_grad_norm=c)
    scale_s, grid_exp = S.secure_grid(sigma * c)
    g = math.ldexp(1.0, grid_exp)
    assert eff == pytest.approx(scale_s * g / (c + math.sqrt(d) * g), rel=1e-15)
    assert 1 - math.sqrt(d) * 2.0**-20 <= eff / sigma < 1.0  # 0.13% below sigma here
    coarse, fine = (S.secure_noise_multiplier(sigma, 1, grid_bits=b) for b in (8, 24))
    assert fine > coarse


def test_secure_poisson_mask():
    n, q = 200_000, 0.01
    m = S.poisson_mask_secure(n, q, key=KEY, step=17)
    assert m.dtype == torch.bool and m.shape == (n,)
    # Binomial(n, q') with q - 2**-64 < q' <= q; 6-sigma bound, p < 2e-9
    assert abs(int(m.sum()) - n * q) < SIX_SIGMA * math.sqrt(n * q * (1 - q))
    parts = [S.poisson_mask_secure(k, q, key=KEY, step=17, index_offset=s)
             for s, k in [(0, 3001), (3001, n - 3001)]]
    assert torch.equal(torch.cat(parts), m)
    assert not torch.equal(m, S.poisson_mask_secure(n, q, key=KEY, step=18))
    assert not S.poisson_mask_secure(1000, 0.0, key=KEY, step=0).any()
    assert S.poisson_mask_secure(1000, 1.0, key=KEY, step=0).all()
    with pytest.raises(ValueError, match="32 bytes"):
        S.poisson_mask_secure(10, 0.5, key=b"short", step=0)
