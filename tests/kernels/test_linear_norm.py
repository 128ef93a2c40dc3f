"""kernels/linear_norm.py: direct per-sample norm of a Linear weight gradient."""
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from helpers import requires_cuda  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from kernels_under_test import ops  # noqa: E402
from kernels_under_test.linear_norm import linear_direct_norm, linear_direct_norm_ref  # noqa: E402

# (atol, rtol) against an fp64 reference on the same (rounded) inputs.  fp64 is the spec-vs-oracle
# check: exact up to summation order.
TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 2e-5)}
# Low precision: error at most this many times PyTorch's own low-precision weight-gradient path.
LOWP_FACTOR = 2.0

# (B, T, d, p, K): batch 1; T = 1/7/37 and d, p = 3/5/33 are not multiples of any block; K > 1.
SHAPES = [(1, 1, 3, 5, 1), (1, 37, 33, 3, 1), (2, 7, 5, 33, 3), (3, 37, 3, 5, 3),
          (2, 7, 33, 33, 1)]


def make(B, T, d, p, K, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(B * K, T, d, generator=gen, dtype=torch.float64)
    G = torch.randn(B * K, T, p, generator=gen, dtype=torch.float64)
    return A.to(device, dtype), G.to(device, dtype)


def oracle(A, G, K):
    """||per-sample grad||^2 from torch.func: grad of sum(F.linear(a, W) * g) over each sample's
    K rows, i.e. exactly what autograd would give a Linear layer with output gradient g."""
    (R, T, d), p = A.shape, G.shape[-1]

    def loss(W, a, g):
        return (F.linear(a, W) * g).sum()

    W = torch.zeros(p, d, dtype=A.dtype)
    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(
        W, A.reshape(R // K, K, T, d), G.reshape(R // K, K, T, p))
    return grads.square().sum((1, 2))


@pytest.mark.parametrize("shape", SHAPES)
def test_ref_matches_vmap_oracle(shape):
    A, G = make(*shape, dtype=torch.float64)
    atol, rtol = TOL[torch.float64]
    torch.testing.assert_close(linear_direct_norm_ref(A, G, shape[-1]), oracle(A, G, shape[-1]),
                               atol=atol, rtol=rtol)


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_ref(shape, device):
    A, G = make(*shape, device=device)
    out = linear_direct_norm(A, G, shape[-1])
    assert out.dtype == torch.float32 and out.shape == (shape[0],)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(out.double().cpu(), linear_direct_norm_ref(A.double(), G.double(),
                               shape[-1]).cpu(), atol=atol, rtol=rtol)


def test_strided_inputs(device):
    # A as a transposed view, G as a column slice: the kernel must follow strides, not assume them.
    A = make(2, 33, 7, 1, 2, device=device)[0].transpose(1, 2)  # (4, 7, 33), non-contiguous
    G = make(2, 7, 9, 1, 2, device=device)[0][:, :, 2:7]  # (4, 7, 5), row stride 9
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(linear_direct_norm(A, G, 2).double(),
                               linear_direct_norm_ref(A.double(), G.double(), 2),
                               atol=atol, rtol=rtol)


def test_empty_batch(device):
    A, G = make(0, 7, 3, 5, 3, device=device)
    out = linear_direct_norm(A, G, 3)
    assert out.shape == (0,) and out.dtype == torch.float32


@pytest.mark.parametrize("A_shape, G_shape, K, dtype, match", [
    ((4, 3), (4, 3, 5), 1, torch.float32, r"A must be \(R, T, d\)"),
    ((4, 3, 2), (4, 2, 5), 1, torch.float32, r"G must be \(R, T, p\) = \(4, 3, p\)"),
    ((4, 3, 2), (4, 3, 5), 3, torch.float32, "multiple of the multiplicity"),
    ((4, 3, 2), (4, 3, 5), 0, torch.float32, "K must be an int >= 1"),
    ((4, 3, 2), (4, 3, 5), 1, torch.float64, "A must be float32, bfloat16 or float16"),
])
def test_bad_inputs_name_the_tensor(A_shape, G_shape, K, dtype, match, device):
    with pytest.raises(ValueError, match=match):
        linear_direct_norm(torch.zeros(A_shape, dtype=dtype, device=device),
                           torch.zeros(G_shape, dtype=dtype, device=device), K)


def test_mixed_dtypes_rejected(device):
    with pytest.raises(ValueError, match="G has dtype torch.float16 but A has torch.float32"):
        linear_direct_norm(torch.zeros(2, 3, 4, device=device),
                           torch.zeros(2, 3, 5, device=device, dtype=torch.float16))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_vs_fp64(dtype):
    A, G = make(4, 37, 65, 33, 2, dtype=dtype, device="cuda")
    ref = linear_direct_norm_ref(A.double(), G.double(), 2)
    # PyTorch's own path: the per-sample weight gradient as a bmm in `dtype`, then its norm.
    M = torch.bmm(A.reshape(4, 74, 65).transpose(1, 2), G.reshape(4, 74, 33))
    torch_err = (M.double().square().sum((1, 2)) - ref).abs().max().item()
    err = (linear_direct_norm(A, G, 2).double() - ref).abs().max().item()
    assert err <= LOWP_FACTOR * torch_err + TOL[torch.float32][1] * ref.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_exactly_under_interpreter(dtype, device):
    # Guards the bf16 upcast that works around the interpreter's bf16 tl.dot: a wrong norm here
    # would silently mis-clip.  Products of bf16/fp16 are exact in fp32, so fp32 tolerance holds.
    if device != "cpu":
        pytest.skip("interpreter-only check; test_low_precision_vs_fp64 covers the GPU")
    A, G = make(2, 7, 5, 33, 3, dtype=dtype)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(linear_direct_norm(A, G, 3).double(),
                               linear_direct_norm_ref(A.double(), G.double(), 3),
                               atol=atol, rtol=rtol)


def test_custom_op_matches_launcher_and_fakes(device):
    A, G = make(2, 7, 5, 33, 3, device=device)
    # Per-tile partials summed by torch: the op is bit-for-bit reproducible.
    assert torch.equal(ops.linear_direct_norm(A, G, 3), linear_direct_norm(A, G, 3))
    assert torch.equal(torch.ops.dpfast.linear_direct_norm(A, G, 3), linear_direct_norm(A, G, 3))
    with FakeTensorMode():
        fake = ops.linear_direct_norm(torch.empty(6, 7, 5), torch.empty(6, 7, 33), 3)
    assert fake.shape == (2,) and fake.dtype == torch.float32


def test_import_kernels_without_triton():
    # `import dpfast` must work where Triton is missing; the package says so instead of failing.
    code = ("import sys; sys.modules['triton'] = None; import kernels; "
            "assert not kernels.HAS_TRITON and 'triton' in kernels.TRITON_IMPORT_ERROR; "
            "assert not hasattr(kernels, 'ops')")
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                   check=True)


def test_rows_beyond_int32_offsets_are_made_contiguous():
    # channels outermost: a row's extent (stride 2^31 along dim 1) passes int32, so the launcher
    # copies to a contiguous layout, whose rows are small (meta tensors: nothing is allocated)
    from kernels_under_test.linear_norm import _row_addressable

    t = torch.empty_strided((3, 2, 4), (1, 2**31, 3), device="meta")
    assert _row_addressable(t).is_contiguous()
    small = torch.zeros(3, 2, 4)
    assert _row_addressable(small) is small
    with pytest.raises(ValueError, match="over 2\\^31 elements"):
        _row_addressable(torch.empty(2, 2**16, 2**15 + 1, device="meta"))
