"""kernels/clipped_wgrad.py: sum_r s[r] * (row r's weight gradient) of bf16/fp16 inputs, in fp32,
against fp64 references on the same rounded inputs (and the references against autograd), on small
odd shapes."""
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from helpers import requires_cuda  # noqa: E402

from kernels_under_test.clipped_wgrad import (conv2d_clipped_wgrad, conv2d_clipped_wgrad_ref,  # noqa: E402
                                   linear_clipped_wgrad, linear_clipped_wgrad_ref)
from test_conv_norm import make  # noqa: E402

TOL = dict(atol=1e-5, rtol=2e-5)  # fp32 accumulation against fp64


def _scales(R, gen):
    return torch.rand(R, generator=gen, dtype=torch.float64) + 0.1


@pytest.mark.parametrize("B, K, T, d, p, strided", [(1, 1, 1, 3, 5, False), (5, 1, 17, 33, 20, True),
                                                    (3, 2, 40, 8, 70, False), (2, 3, 7, 9, 4, True)])
def test_linear_kernel_matches_ref(B, K, T, d, p, strided, device):
    gen = torch.Generator().manual_seed(B * T)
    R = B * K
    A = torch.randn(R, T, d, generator=gen, dtype=torch.float64)
    G = torch.randn(R, p, T, generator=gen, dtype=torch.float64).transpose(1, 2) if strided else \
        torch.randn(R, T, p, generator=gen, dtype=torch.float64)
    s = _scales(B, gen).float()
    A, G = A.bfloat16(), G.bfloat16()  # the reference sees the same rounded values
    out = linear_clipped_wgrad(A.to(device), G.to(device), s.to(device), K)
    assert out.dtype == torch.float32 and out.shape == (p, d)
    torch.testing.assert_close(out.double().cpu(), linear_clipped_wgrad_ref(A, G, s, K).double(), **TOL)


def test_linear_ref_is_the_scaled_autograd_gradient():
    gen = torch.Generator().manual_seed(0)
    A, G, s = torch.randn(4, 6, 3, generator=gen, dtype=torch.float64), \
        torch.randn(4, 6, 5, generator=gen, dtype=torch.float64), _scales(4, gen)
    W = torch.zeros(5, 3, dtype=torch.float64, requires_grad=True)
    (F.linear(A, W) * G * s.view(-1, 1, 1)).sum().backward()
    torch.testing.assert_close(linear_clipped_wgrad_ref(A, G, s), W.grad)


# the conv-norm test cases: groups, stride 2, NHWC, dilation, 3x1 kernels, 1x1, Cout = 33
CONV_CASES = [(2, 1, 4, 6, 9, 8, (3, 3), (2, 2), (1, 1), (1, 1), 2, True),
              (1, 3, 3, 5, 7, 9, (3, 3), (1, 1), (0, 0), (2, 2), 1, False),
              (2, 3, 4, 4, 7, 6, (3, 1), (2, 1), (1, 0), (1, 1), 2, True),
              (1, 1, 5, 3, 5, 5, (1, 1), (1, 1), (0, 0), (1, 1), 1, False),
              (1, 2, 2, 33, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, True)]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_kernel_matches_ref(case, device):
    x, G, kw = make(*case, dtype=torch.float64)  # K = 1, 3, 3, 1, 2: a sample's rows reduce together
    s = _scales(x.shape[0] // kw["K"], torch.Generator().manual_seed(1)).float()
    x, G = x.bfloat16(), G.bfloat16()
    out = conv2d_clipped_wgrad(x.to(device), G.to(device), s.to(device), **kw)
    ref = conv2d_clipped_wgrad_ref(x, G, s, **kw)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out.double().cpu(), ref.double(), **TOL)


@pytest.mark.parametrize("case", CONV_CASES[:3])
def test_conv_ref_is_the_scaled_autograd_gradient(case):
    x, G, kw = make(*case, dtype=torch.float64)
    K = kw["K"]
    s = _scales(x.shape[0] // K, torch.Generator().manual_seed(2))
    W = torch.zeros(G.shape[1], x.shape[1] // kw["groups"], *kw["kernel_size"], dtype=torch.float64,
                    requires_grad=True)
    y = F.conv2d(x, W, None, kw["stride"], kw["padding"], kw["dilation"], kw["groups"])
    (y * G * s.repeat_interleave(K).view(-1, 1, 1, 1)).sum().backward()
    torch.testing.assert_close(conv2d_clipped_wgrad_ref(x, G, s, **kw), W.grad)


def test_bad_inputs_are_refused(device):
    A = torch.zeros(4, 2, 3, device=device, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"one clip factor per sample: shape \(2,\)"):
        linear_clipped_wgrad(A, A, torch.ones(4, device=device), 2)
    with pytest.raises(ValueError, match="must be bfloat16 or float16, got torch.float32"):
        linear_clipped_wgrad(A.float(), A.float(), torch.ones(4, device=device))
    with pytest.raises(ValueError, match="multiple of the multiplicity"):
        linear_clipped_wgrad(A, A, torch.ones(1, device=device), 3)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_exact_products_in_fp32(dtype):
    # bf16/fp16 products are exact in fp32: the kernel matches fp64 on the same rounded inputs to
    # fp32 accumulation error, where a bf16 GEMM output would be ~1e-3 off
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(64, 64, 128, generator=gen).to("cuda", dtype)
    G = torch.randn(64, 64, 96, generator=gen).to("cuda", dtype)
    s = torch.rand(64, generator=gen).cuda()
    ref = linear_clipped_wgrad_ref(A, G, s).double()
    err = (linear_clipped_wgrad(A, G, s).double() - ref).norm() / ref.norm()
    assert err < 1e-5
