"""kernels/conv_norm.py: implicit-GEMM direct and ghost per-sample norms of a Conv2d weight gradient."""
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from helpers import requires_cuda  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from kernels_under_test import ops  # noqa: E402
from kernels_under_test.conv_norm import (conv2d_direct_norm, conv2d_direct_norm_ref,  # noqa: E402
                               conv2d_ghost_norm, conv2d_ghost_norm_ref, conv2d_per_sample_grads,
                               conv2d_per_sample_grads_ref)

LAUNCHERS = {"direct": conv2d_direct_norm, "ghost": conv2d_ghost_norm}
REFS = {"direct": conv2d_direct_norm_ref, "ghost": conv2d_ghost_norm_ref}

# (atol, rtol) against an fp64 reference on the same (rounded) inputs.
TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 2e-5)}
LOWP_FACTOR = 2.0  # low precision: at most 2x PyTorch's own low-precision path's error

# (B, K, Cin, Cout, H, W, kernel, stride, padding, dilation, groups, channels_last)
CASES = [
    (2, 1, 4, 6, 9, 8, (3, 3), (2, 2), (1, 1), (1, 1), 2, True),  # groups, stride 2, NHWC
    (1, 3, 3, 5, 7, 9, (3, 3), (1, 1), (0, 0), (2, 2), 1, False),  # batch 1, K=3, dilation 2
    (2, 3, 4, 4, 7, 6, (3, 1), (2, 1), (1, 0), (1, 1), 2, True),  # 3x1, mixed stride/padding
    (1, 1, 5, 3, 5, 5, (1, 1), (1, 1), (0, 0), (1, 1), 1, False),  # 1x1 "NIN"
    (2, 1, 6, 4, 6, 6, (3, 3), (1, 1), (2, 2), (2, 2), 2, False),  # "same" with dilation 2
    (1, 2, 2, 33, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, True),  # Cout = 33: 3 cout tiles
]


def out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def make(B, K, Cin, Cout, H, W, ks, stride, padding, dilation, groups, channels_last,
         dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    Ho, Wo = (out_size(n, *a) for n, a in zip((H, W), zip(ks, stride, padding, dilation)))
    x = torch.randn(B * K, Cin, H, W, generator=gen, dtype=torch.float64).to(device, dtype)
    G = torch.randn(B * K, Cout, Ho, Wo, generator=gen, dtype=torch.float64).to(device, dtype)
    if channels_last:  # both operands: the kernel must follow strides, not assume NCHW
        x, G = (t.to(memory_format=torch.channels_last) for t in (x, G))
    return x, G, dict(kernel_size=ks, K=K, stride=stride, padding=padding, dilation=dilation,
                      groups=groups)


def oracle(x, G, kernel_size, K, stride, padding, dilation, groups):
    """||per-sample grad||^2 from torch.func: grad of sum(F.conv2d(x, W) * G) over each sample's
    K rows, i.e. what autograd gives a Conv2d with output gradient G."""
    R, Cin = x.shape[:2]

    def loss(W, xi, gi):
        return (F.conv2d(xi, W, None, stride, padding, dilation, groups) * gi).sum()

    W = torch.zeros(G.shape[1], Cin // groups, *kernel_size, dtype=x.dtype)
    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(
        W, x.reshape(R // K, K, *x.shape[1:]), G.reshape(R // K, K, *G.shape[1:]))
    return grads.square().sum((1, 2, 3, 4))


def check_kernel(x, G, kw, method="direct"):
    out = LAUNCHERS[method](x, G, **kw)
    assert out.dtype == torch.float32 and out.shape == (x.shape[0] // kw["K"],)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(out.double().cpu(),
                               conv2d_direct_norm_ref(x.double(), G.double(), **kw).cpu(),
                               atol=atol, rtol=rtol)


@pytest.mark.parametrize("method", REFS)
@pytest.mark.parametrize("case", CASES)
def test_ref_matches_vmap_oracle(case, method):
    x, G, kw = make(*case, dtype=torch.float64)
    atol, rtol = TOL[torch.float64]
    torch.testing.assert_close(REFS[method](x, G, **kw), oracle(x, G, **kw), atol=atol, rtol=rtol)


@pytest.mark.parametrize("method", LAUNCHERS)
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_ref(case, method, device):
    check_kernel(*make(*case, device=device), method)


def test_ghost_kernel_spans_several_position_tiles(device):
    # K*Ho*Wo = 3*7*7 = 147 positions: 10 tiles of 16 under the interpreter, so off-diagonal
    # (doubled) and skipped lower-triangle tiles are both exercised, with a partial last tile.
    check_kernel(*make(2, 3, 4, 5, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, device=device),
                 "ghost")


@st.composite
def conv_cases(draw):
    ks = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride, padding, dilation = (tuple(draw(st.integers(lo, 2)) for _ in "hw")
                                 for lo in (1, 0, 1))
    H, W = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    assume(all(out_size(n, *a) >= 1 for n, a in zip((H, W), zip(ks, stride, padding, dilation))))
    groups = draw(st.integers(1, 2))
    Cin, Cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    return (draw(st.integers(1, 2)), draw(st.integers(1, 2)), Cin, Cout, H, W, ks, stride,
            padding, dilation, groups, draw(st.booleans()))


# derandomize: the same 10 shapes on every run (a seeded test, not a flaky one).
@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # `device` is stateless
@given(case=conv_cases(), method=st.sampled_from(sorted(LAUNCHERS)))
def test_kernel_matches_ref_on_random_shapes(case, method, device):
    check_kernel(*make(*case, device=device), method)


@pytest.mark.parametrize("method", LAUNCHERS)
def test_int_arguments_and_empty_batch(method, device):
    fn = LAUNCHERS[method]
    x, G, _ = make(1, 2, 4, 2, 6, 6, (3, 3), (2, 2), (1, 1), (1, 1), 2, False, device=device)
    kw = dict(K=2, stride=2, padding=1, dilation=1, groups=2)
    torch.testing.assert_close(fn(x, G, 3, **kw), fn(x, G, (3, 3), **{**kw, "stride": (2, 2)}))
    assert fn(x[:0], G[:0], 3, **kw).shape == (0,)


@pytest.mark.parametrize("G_shape, kw, match", [
    ((2, 4, 5, 5), dict(), r"G must be \(R, Cout, Ho, Wo\) = \(2, Cout, 4, 4\)"),
    ((2, 3, 4, 4), dict(groups=2), "groups=2 must divide Cin=4 .* and Cout=3"),
    ((2, 4, 4, 4), dict(padding="same"), "resolve 'same' to ints"),
    ((2, 4, 4, 4), dict(K=3), "multiple of the multiplicity"),
])
@pytest.mark.parametrize("method", LAUNCHERS)
def test_bad_inputs_name_the_tensor(G_shape, kw, match, method, device):
    with pytest.raises(ValueError, match=match):
        LAUNCHERS[method](torch.zeros(2, 4, 6, 6, device=device),
                          torch.zeros(G_shape, device=device), 3, **kw)


@requires_cuda
@pytest.mark.parametrize("method", LAUNCHERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_vs_fp64(dtype, method):
    x, G, kw = make(4, 2, 32, 48, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1), 2, True,
                    dtype=dtype, device="cuda")
    ref = conv2d_direct_norm_ref(x.double(), G.double(), **kw)
    # PyTorch's own path in `dtype`: unfold + per-sample weight-gradient einsum, then norm.
    cols = F.unfold(x, 3, padding=1).reshape(4, 2, 2, 144, 256)
    M = torch.einsum("bkgjl,bkgcl->bgcj", cols, G.reshape(4, 2, 2, 24, 256))
    torch_err = (M.double().square().sum((1, 2, 3)) - ref).abs().max().item()
    err = (LAUNCHERS[method](x, G, **kw).double() - ref).abs().max().item()
    assert err <= LOWP_FACTOR * torch_err + TOL[torch.float32][1] * ref.abs().max().item()


@pytest.mark.parametrize("method", LAUNCHERS)
def test_custom_op_matches_launcher_and_fakes(method, device):
    op = getattr(ops, f"conv2d_{method}_norm")
    x, G, kw = make(*CASES[0], device=device)
    assert torch.equal(op(x, G, **kw), LAUNCHERS[method](x, G, **kw))
    with FakeTensorMode():
        fake = op(torch.empty(6, 4, 9, 8), torch.empty(6, 6, 5, 4), 3, K=3,
                                      stride=2, padding=1, groups=2)
    assert fake.shape == (2,) and fake.dtype == torch.float32


def _psg_oracle(x, G, kernel_size, K, stride, padding, dilation, groups):
    """Each sample's weight gradient from torch.func (what autograd gives a Conv2d with output G)."""
    R, Cin = x.shape[:2]

    def loss(W, xi, gi):
        return (F.conv2d(xi, W, None, stride, padding, dilation, groups) * gi).sum()

    W = torch.zeros(G.shape[1], Cin // groups, *kernel_size, dtype=x.dtype)
    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(
        W, x.reshape(R // K, K, *x.shape[1:]), G.reshape(R // K, K, *G.shape[1:]))


@pytest.mark.parametrize("case", CASES)
def test_per_sample_grads_ref_matches_vmap_oracle(case):
    x, G, kw = make(*case, dtype=torch.float64)
    torch.testing.assert_close(conv2d_per_sample_grads_ref(x, G, **kw), _psg_oracle(x, G, **kw),
                               atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("case", CASES)
def test_per_sample_grads_kernel_writes_each_samples_gradient(case, device):
    """The written tiles, in the weight's (Cin/groups, kh, kw) order also for channels_last inputs
    (whose patch columns are gathered channel-innermost), with partial tiles at every edge."""
    x, G, kw = make(*case, device=device)
    out = conv2d_per_sample_grads(x, G, **kw)
    want = conv2d_per_sample_grads_ref(x.double(), G.double(), **kw)
    assert out.dtype == torch.float32 and out.shape == want.shape
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(out.double().cpu(), want.cpu(), atol=atol, rtol=rtol)


def test_per_sample_grads_bf16_products_are_exact(device):
    """bf16 inputs: the products are exact in the fp32 accumulator, so the gradients agree with the
    fp64 spec on the same rounded inputs to fp32 accumulation error."""
    x, G, kw = make(*CASES[1], dtype=torch.bfloat16, device=device)
    out = conv2d_per_sample_grads(x, G, **kw)
    want = conv2d_per_sample_grads_ref(x.double(), G.double(), **kw)
    torch.testing.assert_close(out.double().cpu(), want.cpu(), atol=1e-5, rtol=2e-5)


def test_per_sample_grads_custom_op_and_fake(device):
    x, G, kw = make(*CASES[0], device=device)
    assert torch.equal(ops.conv2d_per_sample_grads(x, G, **kw), conv2d_per_sample_grads(x, G, **kw))
    with FakeTensorMode():
        fake = ops.conv2d_per_sample_grads(torch.empty(6, 4, 9, 8), torch.empty(6, 6, 5, 4), 3, K=3,
                                           stride=2, padding=1, groups=2)
    assert fake.shape == (2, 6, 2, 3, 3) and fake.dtype == torch.float32
    empty = conv2d_per_sample_grads(x[:0], G[:0], **kw)
    assert empty.shape == (0, 6, 2, 3, 3)
