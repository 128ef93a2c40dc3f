"""kernels/ghost_norm.py: Gram-matrix ("ghost") per-sample norm of a Linear weight gradient."""
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from helpers import requires_cuda  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from kernels_under_test import ops  # noqa: E402
from kernels_under_test.ghost_norm import ghost_norm, ghost_norm_ref  # noqa: E402

# (atol, rtol) against an fp64 reference on the same (rounded) inputs.  Ghost sums signed
# products of Gram entries, so fp32 cancels a little more than direct: rtol is looser.
TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 5e-5)}
LOWP_FACTOR = 2.0  # low precision: at most 2x PyTorch's own low-precision path's error

# (B, T, d, p, K): batch 1; T = 1/7/37 (K*T up to 111: several (t, s) tiles, diagonal and
# off-diagonal); d, p = 3/5/33, none a multiple of a block.
SHAPES = [(1, 1, 3, 5, 1), (1, 37, 33, 3, 1), (2, 7, 5, 33, 3), (2, 37, 3, 5, 3),
          (2, 7, 33, 33, 1)]


def make(B, T, d, p, K, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(B * K, T, d, generator=gen, dtype=torch.float64)
    G = torch.randn(B * K, T, p, generator=gen, dtype=torch.float64)
    return A.to(device, dtype), G.to(device, dtype)


def oracle(A, G, K):
    """||per-sample grad||^2 of a Linear layer from torch.func per-sample gradients."""
    (R, T, d), p = A.shape, G.shape[-1]

    def loss(W, a, g):
        return (F.linear(a, W) * g).sum()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(
        torch.zeros(p, d, dtype=A.dtype), A.reshape(R // K, K, T, d), G.reshape(R // K, K, T, p))
    return grads.square().sum((1, 2))


@pytest.mark.parametrize("shape", SHAPES)
def test_ref_matches_vmap_oracle(shape):
    A, G = make(*shape, dtype=torch.float64)
    atol, rtol = TOL[torch.float64]
    torch.testing.assert_close(ghost_norm_ref(A, G, shape[-1]), oracle(A, G, shape[-1]),
                               atol=atol, rtol=rtol)


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_ref(shape, device):
    A, G = make(*shape, device=device)
    out = ghost_norm(A, G, shape[-1])
    assert out.dtype == torch.float32 and out.shape == (shape[0],)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(out.double().cpu(),
                               ghost_norm_ref(A.double(), G.double(), shape[-1]).cpu(),
                               atol=atol, rtol=rtol)


def test_strided_inputs(device):
    A = make(2, 5, 7, 1, 2, device=device)[0].transpose(1, 2)  # (4, 7, 5), non-contiguous
    G = make(2, 7, 9, 1, 2, device=device)[0][:, :, 2:5]  # (4, 7, 3), row stride 9
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(ghost_norm(A, G, 2).double(),
                               ghost_norm_ref(A.double(), G.double(), 2), atol=atol, rtol=rtol)


def test_empty_batch(device):
    A, G = make(0, 7, 3, 5, 3, device=device)
    assert ghost_norm(A, G, 3).shape == (0,)


def test_bad_shape_names_the_tensor(device):
    with pytest.raises(ValueError, match=r"G must be \(R, T, p\) = \(4, 3, p\)"):
        ghost_norm(torch.zeros(4, 3, 2, device=device), torch.zeros(4, 2, 5, device=device))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_vs_fp64(dtype):
    A, G = make(4, 37, 65, 33, 2, dtype=dtype, device="cuda")
    ref = ghost_norm_ref(A.double(), G.double(), 2)
    # PyTorch's own path in `dtype`: the two Gram matrices as bmm, their product summed in fp32.
    A3, G3 = A.reshape(4, 74, 65), G.reshape(4, 74, 33)
    grams = torch.bmm(A3, A3.transpose(1, 2)).float() * torch.bmm(G3, G3.transpose(1, 2)).float()
    torch_err = (grams.double().sum((1, 2)) - ref).abs().max().item()
    err = (ghost_norm(A, G, 2).double() - ref).abs().max().item()
    assert err <= LOWP_FACTOR * torch_err + TOL[torch.float32][1] * ref.abs().max().item()


def test_custom_op_matches_launcher_and_fakes(device):
    A, G = make(2, 7, 5, 33, 3, device=device)
    assert torch.equal(ops.ghost_norm(A, G, 3), ghost_norm(A, G, 3))
    with FakeTensorMode():
        fake = ops.ghost_norm(torch.empty(6, 7, 5), torch.empty(6, 7, 33), 3)
    assert fake.shape == (2,) and fake.dtype == torch.float32
