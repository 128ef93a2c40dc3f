"""dpfast.random (the spec of the noise and Poisson streams) and its compiled twin in dpfast._C.

Statistical tests use fixed seeds and bounds whose false-failure probability under a correct
generator is stated next to them (all < 1e-8).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_noise_close, requires_ext

from dpfast import random as R

# Random123 kat_vectors, "philox4x32 10" lines: (counter[4], key[2]) -> output[4].
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# 6-sigma two-sided bound of a normal statistic: P(|N(0,1)| > 6) = 1.97e-9.
SIX_SIGMA = 6.0


def _ext():
    from dpfast._ext import ext

    return ext


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers_reference(counter, key, expected):
    out = R.philox4x32(np.array([counter], dtype=np.uint32), np.array(key, dtype=np.uint32))
    assert out.dtype == np.uint32
    assert tuple(int(v) for v in out[0]) == expected


@requires_ext
@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers_ext(counter, key, expected):
    assert _ext().philox4x32(*counter, *key) == expected


def test_philox_vectorised_rows_are_independent():
    rows = np.array([c for c, _, _ in PHILOX_KAT[:2]], dtype=np.uint32)
    out = R.philox4x32(rows, np.zeros(2, dtype=np.uint32))
    single = R.philox4x32(rows[1:], np.zeros(2, dtype=np.uint32))
    assert tuple(out[0]) == PHILOX_KAT[0][2]
    np.testing.assert_array_equal(out[1], single[0])


def test_counter_and_key_layout():
    # Block b, step s, stream t of seed k is exactly counter (b lo, b hi, s, t) under key (k lo, k hi).
    b, s, seed = (7 << 32) | 11, 5, (3 << 32) | 9
    x = R.philox_blocks(np.array([b]), seed=seed, step=s, stream=R.STREAM_POISSON)
    ref = R.philox4x32(np.array([[11, 7, 5, 1]], dtype=np.uint32), np.array([9, 3], dtype=np.uint32))
    np.testing.assert_array_equal(x, ref)


def test_uniforms_strictly_inside_unit_interval():
    u = R.uniforms(np.array([0, 0xFFFFFFFF], dtype=np.uint32))
    assert u[0] == 0.5 * 2.0**-32 and u[1] == 1.0 - 0.5 * 2.0**-32


def _box_muller_pair(x):
    """The contract written out with Python ints and math: one Philox block -> (z_2b, z_2b+1)."""
    x = [int(v) for v in x]
    w0, w1 = x[0] | (x[1] << 32), x[2] | (x[3] << 32)
    r = math.sqrt(-2 * math.log((float(w0) + 0.5) * 2.0**-64))
    t = 2 * math.pi * ((w1 >> 11) * 2.0**-53)
    return r * math.cos(t), r * math.sin(t)


def test_normal_is_box_muller_of_the_block():
    seed, step = 123, 4
    x = R.philox_blocks(np.array([4, 5]), seed=seed, step=step, stream=R.STREAM_NOISE)
    expected = [*_box_muller_pair(x[0]), *_box_muller_pair(x[1])]
    got = R.normal_f64(4, seed=seed, step=step, offset=8)  # elements 8..11 = blocks 4, 5
    np.testing.assert_allclose(got, expected, rtol=1e-14, atol=1e-14)


# Known answers of the noise stream (float64 hex, numpy on x86-64 glibc); changing them changes
# every run's noise, so it must be deliberate.
NORMAL_KAT = (7, 3, 5, ["0x1.6048bcbef4b16p-2", "0x1.bd103817b661cp-1", "0x1.198750e50bfa2p-1",
                        "-0x1.a7e670f73c742p-1", "-0x1.7b1af4ee556a2p-1"])


def test_normal_known_answers():
    seed, step, offset, want = NORMAL_KAT
    got = R.normal_f64(len(want), seed=seed, step=step, offset=offset)
    np.testing.assert_allclose(got, [float.fromhex(h) for h in want], rtol=1e-15, atol=0)


def test_uniforms_reach_past_8_sigma():
    # The radius uniform of the smallest word is 2**-65 and gives |z| = 9.49 (cos 0 = 1).
    u = R.radius_uniforms(np.array([0, 1, 2**52 - 1, 2**64 - 1], dtype=np.uint64))
    assert u[0] == 2.0**-65 and u[1] == 1.5 * 2.0**-64 and u[2] == (2**52 - 0.5) * 2.0**-64
    assert u[3] == 1.0  # rounds up: r = 0, still finite
    assert R.max_abs_normal() == pytest.approx(math.sqrt(130 * math.log(2)), rel=1e-15)
    assert R.max_abs_normal() > 9.49
    assert R.max_abs_normal(2.0**-33) == pytest.approx(6.7637, abs=1e-4)  # the old 32-bit cap
    z = _box_muller_pair(np.array([0, 0, 0, 0], dtype=np.uint32))  # w0 = 0, angle 0
    assert z[0] == pytest.approx(R.max_abs_normal(), rel=1e-15) and z[0] > 8
    t = R.angle_uniforms(np.array([0, 2**64 - 1], dtype=np.uint64))
    assert t[0] == 0.0 and t[1] == 1.0 - 2.0**-53


def test_truncation_delta_reproduces_the_review_and_states_the_residual():
    demo = dict(noise_multiplier=0.357, steps=200, sample_rate=0.002133)
    old = R.truncation_delta(**demo, z_max=R.max_abs_normal(2.0**-33))
    assert old == pytest.approx(1.58e-5, rel=1e-2) and old > 1e-5  # the review's 1.6e-5
    new = R.truncation_delta(**demo)
    assert new == pytest.approx(4.71e-12, rel=1e-2)
    # Formula: steps * q * P(z_max - 1/sigma < Z <= z_max), normalised by P(|Z| <= z_max).
    z = R.max_abs_normal()
    q_tail = 0.5 * math.erfc((z - 1 / 0.357) / math.sqrt(2))
    assert new == pytest.approx(200 * 0.002133 * q_tail, rel=1e-6)
    # Larger sigma: smaller shift, smaller delta; huge shift: the whole sampled mass.
    assert R.truncation_delta(1.0, 1) < R.truncation_delta(0.357, 1)
    assert R.truncation_delta(1e-3, 1, 0.5) == pytest.approx(0.5)


@pytest.mark.parametrize("offset,n", [(0, 1), (1, 3), (3, 5), (5, 1023), (2, 4097)])
def test_normal_windows_agree_with_the_whole_stream(offset, n):
    whole = R.normal_f64(offset + n + 3, seed=9, step=2)
    np.testing.assert_array_equal(R.normal_f64(n, seed=9, step=2, offset=offset), whole[offset : offset + n])


def test_normal_dtype_device_and_empty():
    z = R.normal(5, seed=1, step=0, dtype=torch.float64)
    assert z.dtype == torch.float64 and z.shape == (5,) and z.device.type == "cpu"
    assert R.normal(0, seed=1, step=0).shape == (0,)
    assert torch.equal(R.normal(5, seed=1, step=0), z.float())


@pytest.mark.parametrize("seed,step", [(-1, 0), (2**64, 0), (0, -1), (0, 2**32)])
def test_seed_and_step_ranges(seed, step):
    with pytest.raises(ValueError, match="seed|step"):
        R.normal(4, seed=seed, step=step)


def test_large_seed_step_and_offset_are_exact():
    # Highest seed and step, and an element index beyond 2**33 (block counter's high word in use).
    seed, step, offset = 2**64 - 1, 2**32 - 1, 2**33 + 6
    z = R.normal_f64(3, seed=seed, step=step, offset=offset)
    x = R.philox4x32(np.array([[3, 1, step, 0], [4, 1, step, 0]], dtype=np.uint32),
                     np.array([0xFFFFFFFF, 0xFFFFFFFF], dtype=np.uint32))
    want = [*_box_muller_pair(x[0]), _box_muller_pair(x[1])[0]]
    np.testing.assert_allclose(z, want, rtol=1e-14, atol=0)


def test_gaussian_moments_of_a_million_draws():
    n = 10**6
    z = R.normal_f64(n, seed=2024, step=7)
    # Mean ~ N(0, 1/n); variance estimate ~ N(1, 2/n); each bound fails with p < 2e-9.
    assert abs(z.mean()) < SIX_SIGMA / math.sqrt(n)
    assert abs(z.var() - 1.0) < SIX_SIGMA * math.sqrt(2.0 / n)
    # Tail mass: P(|z| > 3) = 0.0026998; binomial count with a 6-sigma bound (p < 2e-9).
    p3 = math.erfc(3 / math.sqrt(2))
    assert abs((np.abs(z) > 3).sum() - n * p3) < SIX_SIGMA * math.sqrt(n * p3 * (1 - p3))


def test_gaussian_distribution_kolmogorov_smirnov():
    stats = pytest.importorskip("scipy.stats")
    z = R.normal_f64(200_000, seed=5, step=0, offset=12345)
    assert stats.kstest(z, "norm").pvalue > 1e-8  # false failure with probability 1e-8


@pytest.mark.parametrize("change", ["seed", "step", "offset"])
def test_seed_step_and_offset_change_the_stream(change):
    n = 100_000
    base = dict(seed=11, step=3, offset=0)
    other = dict(base, **{change: base[change] + 1 if change != "offset" else 2 * 1000 + 1})
    a, b = R.normal_f64(n, **base), R.normal_f64(n, **other)
    # Independent streams: sample correlation ~ N(0, 1/n); 6-sigma bound, p < 2e-9.
    assert abs(np.corrcoef(a, b)[0, 1]) < SIX_SIGMA / math.sqrt(n)


def test_streams_are_distinct():
    blocks = np.arange(50_000)
    noise = R.uniforms(R.philox_blocks(blocks, seed=1, step=1, stream=R.STREAM_NOISE)[:, 0])
    poisson = R.poisson_uniforms(blocks, seed=1, step=1)
    aux = R.uniforms(R.philox_blocks(blocks, seed=1, step=1, stream=R.STREAM_AUX)[:, 0])
    bound = SIX_SIGMA / math.sqrt(len(blocks))
    assert abs(np.corrcoef(noise, poisson)[0, 1]) < bound
    assert abs(np.corrcoef(poisson, aux)[0, 1]) < bound


def test_poisson_mask_frequency():
    n, q = 200_000, 0.01
    m = R.poisson_mask(n, q, seed=3, step=17)
    assert m.dtype == torch.bool and m.shape == (n,)
    # Batch size ~ Binomial(n, q); 6-sigma bound, p < 2e-9 (normal approximation, n q = 2000).
    assert abs(int(m.sum()) - n * q) < SIX_SIGMA * math.sqrt(n * q * (1 - q))


def test_poisson_membership_is_independent_across_steps():
    n, q = 200_000, 0.05
    a = R.poisson_mask(n, q, seed=3, step=0)
    b = R.poisson_mask(n, q, seed=3, step=1)
    both = int((a & b).sum())  # ~ Binomial(n, q^2) for independent steps; 6-sigma, p < 2e-9
    assert abs(both - n * q * q) < SIX_SIGMA * math.sqrt(n * q * q * (1 - q * q))


def test_poisson_shards_compose_to_the_full_mask():
    full = R.poisson_mask(10_000, 0.1, seed=8, step=2)
    parts = [R.poisson_mask(n, 0.1, seed=8, step=2, index_offset=s) for s, n in [(0, 3001), (3001, 6999)]]
    assert torch.equal(torch.cat(parts), full)
    u = R.poisson_uniforms(torch.arange(5, 9), seed=8, step=2)
    assert torch.equal(torch.from_numpy(u < 0.1), full[5:9])


def test_poisson_edge_cases():
    assert not R.poisson_mask(1000, 0.0, seed=0, step=0).any()
    assert R.poisson_mask(1000, 1.0, seed=0, step=0).all()
    with pytest.raises(ValueError):
        R.poisson_mask(10, 1.5, seed=0, step=0)
    with pytest.raises(ValueError):
        R.poisson_uniforms(np.array([-1]), seed=0, step=0)


@requires_ext
@pytest.mark.parametrize("n,offset", [(1, 0), (3, 1), (5, 3), (1023, 5), (4097, 2), (100_003, 7)])
def test_ext_normal_matches_reference(n, offset):
    out = torch.empty(n)
    _ext().normal_cpu(out.data_ptr(), n, offset, 77, 12)
    ref = R.normal_f64(n, seed=77, step=12, offset=offset)
    # float32 rounding of float64 values that may differ in the last bits (libm vs numpy).
    assert_noise_close(out, torch.from_numpy(ref).float())


@requires_ext
def test_ext_poisson_uniforms_match_reference_exactly():
    idx = torch.cat([torch.arange(0, 60_000), torch.tensor([2**32 - 1, 2**32, 2**40 + 3])])
    out = torch.empty(len(idx), dtype=torch.float64)
    _ext().poisson_uniforms_cpu(out.data_ptr(), idx.data_ptr(), len(idx), 2**63 + 5, 99)
    ref = R.poisson_uniforms(idx, seed=2**63 + 5, step=99)
    assert torch.equal(out, torch.from_numpy(ref))  # integer Philox + exact conversion: bitwise


@requires_ext
def test_ext_argument_checks():
    ext = _ext()
    out = torch.empty(4)
    with pytest.raises(ValueError, match="step"):
        ext.normal_cpu(out.data_ptr(), 4, 0, 0, 2**32)
    with pytest.raises(ValueError, match="seed"):
        ext.normal_cpu(out.data_ptr(), 4, 0, -1, 0)
    with pytest.raises(ValueError, match="out_ptr"):
        ext.normal_cpu(0, 4, 0, 0, 0)
    with pytest.raises(ValueError, match="n must be"):
        ext.normal_cpu(out.data_ptr(), -1, 0, 0, 0)
    with pytest.raises(ValueError, match="indices_ptr"):
        ext.poisson_uniforms_cpu(out.data_ptr(), 0, 1, 0, 0)
