"""dpfast.finalize in secure mode (generator="chacha20"): compiled CPU/CUDA against the reference.

Integer arithmetic up to one final rounding: every implementation must agree bitwise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import requires_cuda_ext, requires_ext

import dpfast.finalize as F
from dpfast import random_secure as S

KEY = bytes(range(100, 132))
SIZES = [1, 3, 5, 1023, 2049]
KW = dict(noise_std=1.3 * 0.7, scale=1.0 / 256, step=41, generator="chacha20", key=KEY)
SIX_SIGMA = 6.0


def _ext():
    from dpfast._ext import ext

    return ext


def _tensors(sizes, *, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).mul_(3.0).to(device) for n in sizes]


def _run(fn, accs, offsets=None, **kw):
    outs = [torch.empty_like(a) for a in accs]
    fn(accs, outs, offsets=offsets, **kw)
    return outs


def test_ref_is_the_formula():
    accs = _tensors([7, 300])
    outs = _run(F.finalize_ref, accs, **KW)
    scale_s, grid_exp = S.secure_grid(KW["noise_std"])
    for a, o, off in zip(accs, outs, F.default_offsets(accs)):
        k = S.discrete_gaussian(a.numel(), key=KEY, step=KW["step"], scale_s=scale_s, offset=off)
        a_grid = np.rint(np.ldexp(a.double().numpy(), -grid_exp)).astype(np.int64)
        want = torch.from_numpy(np.ldexp((a_grid + k).astype(np.float64), grid_exp) * KW["scale"]).float()
        assert torch.equal(o, want)


@requires_ext
@pytest.mark.parametrize("offsets", [None, [9, 0, 3, 10_001, 2**33]], ids=["running", "custom"])
def test_ext_cpu_matches_ref_bitwise(offsets):
    accs = _tensors(SIZES, seed=1)
    accs[3][::97] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 0.0,
                                  1e-30, 2.0**-40, 5e20, -1.5, 7.0])[: accs[3][::97].numel()]
    got = _run(F.finalize_, accs, offsets=offsets, **KW)
    want = _run(F.finalize_ref, accs, offsets=offsets, **KW)
    for g, w in zip(got, want):
        assert torch.equal(g.isnan(), w.isnan())
        assert torch.equal(g.nan_to_num(), w.nan_to_num())
    assert got[3][0].isnan() and got[3][97].isnan() and got[3][194].isnan()  # NaN, +-inf -> NaN


@requires_ext
def test_ext_cpu_in_place_and_split_invariant():
    flat = _tensors([sum(SIZES) + 7], seed=3)[0]
    whole = _run(F.finalize_, [flat], **KW)[0]
    pieces = [p.clone() for p in flat.split(SIZES + [7])]
    offsets = F.default_offsets(pieces)
    F.finalize_(pieces[::-1], pieces[::-1], offsets=offsets[::-1], **KW)
    assert torch.equal(torch.cat(pieces), whole)


def test_output_is_on_the_grid_and_noise_has_the_stated_scale():
    # acc on the grid and scale = 1: out / g - acc / g is the integer noise k exactly.
    n = 200_000 if _ext() is not None else 4000
    acc = torch.linspace(-5, 5, n)
    kw = dict(KW, scale=1.0)
    out = _run(F.finalize_, [acc], **kw)[0].double()
    scale_s, grid_exp = S.secure_grid(kw["noise_std"])
    g = math.ldexp(1.0, grid_exp)
    a = torch.round(acc.double() / g)
    k = out / g - a
    # float32 output: exact integers only while |out / g| < 2**24 (|out| < 16 here): compare in float32
    assert torch.equal(((a + torch.round(k)) * g).float(), out.float())
    z = (out - acc.double()) / (scale_s * g)
    # mean ~ N(0, 1/n), variance ~ N(1, 2/n); 6-sigma, p < 2e-9 each (plus the float32 rounding
    # of out, below 1e-6 relative)
    assert abs(z.mean().item()) < SIX_SIGMA / math.sqrt(n) + 1e-6
    assert abs(z.var().item() - 1.0) < SIX_SIGMA * math.sqrt(2.0 / n) + 1e-5
    assert scale_s * g >= kw["noise_std"]


def test_fresh_key_per_call_when_none():
    acc = [torch.zeros(64)]
    a = _run(F.finalize_, acc, **dict(KW, key=None))[0]
    b = _run(F.finalize_, acc, **dict(KW, key=None))[0]
    assert not torch.equal(a, b)
    assert torch.equal(_run(F.finalize_, acc, **KW)[0], _run(F.finalize_, acc, **KW)[0])


def test_zero_noise_is_the_plain_scaling():
    accs = _tensors([5, 9], seed=4)
    outs = _run(F.finalize_, accs, **dict(KW, noise_std=0.0))
    for a, o in zip(accs, outs):
        assert torch.equal(o, (a.double() * KW["scale"]).float())


def test_empty_inputs():
    F.finalize_([], [], **KW)
    e = torch.empty(0)
    F.finalize_([e, torch.ones(3)], [e, torch.empty(3)], **KW)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(key=b"k" * 31), ValueError, "key must be 32 bytes, got 31"),
    (dict(key="k" * 32), TypeError, "key must be 32 bytes"),
    (dict(generator="aes"), ValueError, "generator must be one of"),
    (dict(grid_bits=0), ValueError, "grid_bits"),
    (dict(grid_bits=25), ValueError, "grid_bits"),
    (dict(grid_bits=25, noise_std=0.0), ValueError, "grid_bits"),
    (dict(step=2**32), ValueError, "step"),
    (dict(noise_std=-1.0), ValueError, "noise_std"),
    (dict(generator="philox", key=None), ValueError, "seed is required"),
])
@pytest.mark.parametrize("fn", [F.finalize_, F.finalize_ref], ids=["finalize_", "finalize_ref"])
def test_bad_arguments_are_refused_in_one_line(fn, bad, exc, match):
    with pytest.raises(exc, match=match) as info:
        fn([torch.zeros(2)], [torch.zeros(2)], **dict(KW, **bad))
    assert "\n" not in str(info.value)


def test_philox_signature_still_works():
    a = torch.zeros(10)
    F.finalize_([a], [a], noise_std=1.0, scale=0.5, seed=1, step=2)
    assert a.abs().sum() > 0


@requires_ext
def test_ext_boundary_checks():
    ext = _ext()
    a = torch.zeros(4)
    p = a.data_ptr()
    with pytest.raises(ValueError, match="key must be 32 bytes"):
        ext.finalize_secure_cpu([p], [p], [4], [0], b"x", 4, 0, 1.0, 0)
    with pytest.raises(ValueError, match="scale_s"):
        ext.finalize_secure_cpu([p], [p], [4], [0], KEY, 0, 0, 1.0, 0)
    with pytest.raises(ValueError, match="grid_exp"):
        ext.finalize_secure_cpu([p], [p], [4], [0], KEY, 4, 5000, 1.0, 0)
    with pytest.raises(ValueError, match="scale"):
        ext.finalize_secure_cpu([p], [p], [4], [0], KEY, 4, 0, float("inf"), 0)
    with pytest.raises(ValueError, match=r"acc_ptrs\[0\]"):
        ext.finalize_secure_cpu([0], [p], [4], [0], KEY, 4, 0, 1.0, 0)


# ---- CUDA (skipped without a GPU and a CUDA build) ------------------------------------------------


@requires_cuda_ext
def test_cuda_matches_cpu_bitwise():
    accs = _tensors(SIZES + [1 << 18], seed=6)
    offsets = [9, 0, 3, 10_001, 2**33, 20_000]
    want = _run(F.finalize_, accs, offsets=offsets, **KW)
    got = _run(F.finalize_, [a.cuda() for a in accs], offsets=offsets, **KW)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)


@requires_cuda_ext
def test_cuda_in_place_many_tensors():
    sizes = [(i * 7) % 13 + 1 for i in range(1000)]
    storage = torch.randn(sum(sizes) + 1, device="cuda")
    accs = list(storage[1:].split(sizes))
    want = _run(F.finalize_, [a.cpu() for a in accs], **KW)
    F.finalize_(accs, accs, **KW)
    torch.cuda.synchronize()
    for a, w in zip(accs, want):
        assert torch.equal(a.cpu(), w)
