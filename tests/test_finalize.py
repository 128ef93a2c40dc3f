"""dpfast.finalize: the compiled CPU/CUDA finalize against finalize_ref (the spec)."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_noise_close, requires_cuda_ext, requires_ext
from hypothesis import given, settings
from hypothesis import strategies as st

import dpfast.finalize as F
from dpfast import random as R

ODD_SIZES = [1, 3, 5, 1023, 4097]
SEED, STEP = 0xDEADBEEF12345, 41


def _ext():
    from dpfast._ext import ext

    return ext


def _tensors(sizes, *, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).mul_(3.0).to(device) for n in sizes]


def assert_finalize_close(got, want, accs, *, noise_std, scale, **_):
    """Kernels vs reference differ only by the last bits of log/sin/cos in float64, then one
    float32 rounding: allow 2 float32 ulps of the magnitude of the terms being summed."""
    for i, (g, w, a) in enumerate(zip(got, want, accs)):
        z_bound = 9.5  # |z| <= dpfast.random.max_abs_normal() = 9.49
        tol = 2.5e-7 * (a.double().abs() + noise_std * z_bound) * abs(scale) + 1e-30
        err = (g.double() - w.double()).abs()
        assert bool((err <= tol).all()), f"tensor {i}: max error {err.max().item()} (tolerance {tol.min().item()})"


def _run(fn, accs, offsets=None, **kw):
    outs = [torch.empty_like(a) for a in accs]
    fn(accs, outs, offsets=offsets, **kw)
    return outs


KW = dict(noise_std=1.3 * 0.7, scale=1.0 / 256, seed=SEED, step=STEP)


def test_require_ext_env():
    """CI sets DPFAST_REQUIRE_EXT=1: there the compiled extension must be what is tested."""
    from dpfast._ext import ext, import_error

    if os.environ.get("DPFAST_REQUIRE_EXT", "") != "1":
        pytest.skip("DPFAST_REQUIRE_EXT is not set")
    assert ext is not None, f"dpfast._C failed to import: {import_error}"


def test_ref_matches_the_formula():
    accs = _tensors(ODD_SIZES)
    offsets = F.default_offsets(accs)
    outs = _run(F.finalize_ref, accs, **KW)
    for a, o, off in zip(accs, outs, offsets):
        z = R.normal_f64(a.numel(), seed=SEED, step=STEP, offset=off)
        want = ((a.double() + KW["noise_std"] * torch.from_numpy(z)) * KW["scale"]).float()
        assert torch.equal(o, want)


@requires_ext
@pytest.mark.parametrize("offsets", [None, [9, 0, 3, 10_001, 1100]], ids=["running", "custom"])
def test_ext_cpu_matches_ref(offsets):
    accs = _tensors(ODD_SIZES, seed=1)
    got = _run(F.finalize_, accs, offsets=offsets, **KW)
    want = _run(F.finalize_ref, accs, offsets=offsets, **KW)
    assert_finalize_close(got, want, accs, **KW)


@requires_ext
def test_ext_cpu_in_place():
    accs = _tensors(ODD_SIZES, seed=2)
    want = _run(F.finalize_, accs, **KW)
    F.finalize_(accs, accs, **KW)
    for a, w in zip(accs, want):
        assert torch.equal(a, w)


@pytest.mark.parametrize("impl", ["ext", "ref"])
def test_noise_does_not_depend_on_how_the_vector_is_split(impl):
    if impl == "ext" and _ext() is None:
        pytest.skip("dpfast._C is not built")
    fn = F.finalize_ if impl == "ext" else F.finalize_ref
    flat = _tensors([sum(ODD_SIZES) + 7], seed=3)[0]
    whole = _run(fn, [flat], **KW)[0]
    sizes = ODD_SIZES + [7]
    pieces = list(flat.split(sizes))
    # Same global offsets, reversed list order: the order of tensors must not matter either.
    offsets = F.default_offsets(pieces)
    outs = _run(fn, pieces[::-1], offsets=offsets[::-1], **KW)[::-1]
    assert torch.equal(torch.cat(outs), whole)


@requires_ext
@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    sizes=st.lists(st.integers(0, 70), min_size=1, max_size=6),
    base=st.integers(0, 2**40),
    gaps=st.lists(st.integers(0, 9), min_size=6, max_size=6),
    step=st.integers(0, 2**32 - 1),
)
def test_ext_cpu_matches_ref_property(sizes, base, gaps, step):
    accs = _tensors(sizes, seed=len(sizes))
    offsets, pos = [], base
    for n, gap in zip(sizes, gaps):
        pos += gap
        offsets.append(pos)
        pos += n
    kw = dict(KW, step=step)
    got = _run(F.finalize_, accs, offsets=offsets, **kw)
    want = _run(F.finalize_ref, accs, offsets=offsets, **kw)
    assert_finalize_close(got, want, accs, **kw)


@pytest.mark.parametrize("impl", ["ext", "ref"])
def test_zero_noise_skips_the_generator(impl, monkeypatch):
    if impl == "ext" and _ext() is None:
        pytest.skip("dpfast._C is not built")

    def boom(*a, **k):
        raise AssertionError("noise generated although noise_std == 0")

    monkeypatch.setattr(R, "normal", boom)
    accs = _tensors(ODD_SIZES, seed=4)
    fn = F.finalize_ if impl == "ext" else F.finalize_ref
    outs = _run(fn, accs, **dict(KW, noise_std=0.0))
    for a, o in zip(accs, outs):
        assert torch.equal(o, (a.double() * KW["scale"]).float())


def test_empty_inputs():
    F.finalize_([], [], **KW)
    a = torch.empty(0)
    F.finalize_([a, torch.ones(3)], [a, torch.empty(3)], **KW)


def test_seeds_and_steps_change_the_noise():
    acc = [torch.zeros(1000)]
    base = _run(F.finalize_, acc, **KW)[0]
    assert not torch.equal(base, _run(F.finalize_, acc, **dict(KW, step=STEP + 1))[0])
    assert not torch.equal(base, _run(F.finalize_, acc, **dict(KW, seed=SEED + 1))[0])
    assert torch.equal(base, _run(F.finalize_, acc, **KW)[0])


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a, o: (a, o[:-1], None), "same length"),
        (lambda a, o: (a, [o[0], o[1].double()], None), r"outs\[1\] must be float32"),
        (lambda a, o: ([a[0], torch.empty(6)[::2]], o, None), r"accs\[1\] must be contiguous"),
        (lambda a, o: (a, [o[0], torch.empty(4)], None), r"accs\[1\] has 3 elements but outs\[1\] has 4"),
        (lambda a, o: (a, o, [0]), "one entry per tensor"),
        (lambda a, o: (a, o, [0, -1]), r"offsets\[1\] must be >= 0"),
        (lambda a, o: (a, o, [0, 1]), "overlaps"),
        (lambda a, o: ([a[0], 3.0], o, None), r"accs\[1\] must be a torch.Tensor"),
    ],
)
def test_argument_errors_name_the_tensor(mutate, match):
    accs, outs = [torch.zeros(2), torch.zeros(3)], [torch.zeros(2), torch.zeros(3)]
    accs, outs, offsets = mutate(accs, outs)
    with pytest.raises((ValueError, TypeError), match=match):
        F.finalize_(accs, outs, offsets=offsets, **KW)


@pytest.mark.parametrize("bad", [dict(step=2**32), dict(step=-1), dict(seed=-1), dict(noise_std=-1.0),
                                 dict(noise_std=float("nan")), dict(scale=float("inf"))])
def test_scalar_argument_errors(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        F.finalize_([torch.zeros(2)], [torch.zeros(2)], **dict(KW, **bad))


@requires_ext
def test_ext_boundary_checks():
    ext = _ext()
    a = torch.zeros(4)
    p = a.data_ptr()
    with pytest.raises(ValueError, match="equal lengths"):
        ext.finalize_cpu([p, p], [p], [4, 4], [0, 4], 1.0, 1.0, 0, 0)
    with pytest.raises(ValueError, match=r"acc_ptrs\[1\]"):
        ext.finalize_cpu([p, 0], [p, p], [4, 4], [0, 4], 1.0, 1.0, 0, 0)
    with pytest.raises(ValueError, match=r"numels\[0\]"):
        ext.finalize_cpu([p], [p], [-1], [0], 1.0, 1.0, 0, 0)
    with pytest.raises(ValueError, match="step"):
        ext.finalize_cpu([p], [p], [4], [0], 1.0, 1.0, 0, 2**32)
    with pytest.raises(ValueError, match="noise_std"):
        ext.finalize_cpu([p], [p], [4], [0], -1.0, 1.0, 0, 0)
    ext.finalize_cpu([0], [0], [0], [0], 1.0, 1.0, 0, 0)  # empty tensors may have null pointers


def test_autograd_sees_the_in_place_write():
    a = torch.zeros(8)
    v = a._version
    F.finalize_([a], [a], **KW)
    assert a._version > v


def test_gaussian_noise_matches_reference():
    z = F.gaussian_noise(1001, seed=5, step=6, offset=3)
    ref = R.normal(1001, seed=5, step=6, offset=3)
    assert_noise_close(z, ref)


# ---- CUDA (skipped without a GPU and a CUDA build) ------------------------------------------------


@requires_cuda_ext
@pytest.mark.parametrize("noise_std", [0.0, 0.91])
def test_cuda_matches_cpu(noise_std):
    kw = dict(KW, noise_std=noise_std)
    accs = _tensors(ODD_SIZES + [1 << 20], seed=6)
    offsets = [9, 0, 3, 10_001, 1100, 20_000]
    want = _run(F.finalize_, accs, offsets=offsets, **kw)
    got = _run(F.finalize_, [a.cuda() for a in accs], offsets=offsets, **kw)
    assert_finalize_close([g.cpu() for g in got], want, accs, **kw)


@requires_cuda_ext
def test_cuda_in_place_unaligned_and_many_tensors():
    # 1000 tensors (more than one launch's capacity), views at odd storage offsets (scalar path).
    sizes = [(i * 7) % 13 + 1 for i in range(1000)]
    storage = torch.randn(sum(sizes) + 1, device="cuda")
    accs = list(storage[1:].split(sizes))
    accs_cpu = [a.cpu() for a in accs]
    want = _run(F.finalize_, accs_cpu, **KW)
    F.finalize_(accs, accs, **KW)
    torch.cuda.synchronize()
    assert_finalize_close([a.cpu() for a in accs], want, accs_cpu, **KW)


@requires_cuda_ext
def test_cuda_noise_matches_cpu_noise():
    n, offset = (1 << 20) + 3, 5
    z_gpu = F.gaussian_noise(n, seed=SEED, step=STEP, offset=offset, device="cuda").cpu()
    z_cpu = F.gaussian_noise(n, seed=SEED, step=STEP, offset=offset)
    assert_noise_close(z_gpu, z_cpu)


@requires_cuda_ext
def test_cuda_runs_on_the_current_stream():
    acc = torch.randn(1 << 16, device="cuda")
    want = _run(F.finalize_, [acc.cpu()], **KW)[0]
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = torch.empty_like(acc)
        F.finalize_([acc], [out], **KW)
    s.synchronize()
    assert_finalize_close([out.cpu()], [want], [acc.cpu()], **KW)
