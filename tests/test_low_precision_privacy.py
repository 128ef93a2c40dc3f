"""Under bf16 autocast the clipped sum the noise covers is the exact clipped sum of the per-sample
gradients (of the bf16 activations and output gradients the step really saw), to fp32 accuracy.

The accountant assumes that adding or removing one sample moves the released sum by at most
max_grad_norm C. Rounding s*G or the sum to bf16 adds a data-dependent error of ~2^-9 of the sum:
with B aligned samples that is a sizeable fraction of C (0.2-0.4 C at B=128-256 before this was
fixed), an unaccounted change of the sensitivity. The error is measured here in units of C."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dpfast import PrivacyEngine

C = 0.05
# (backend, batch): the triton kernels run interpreted on CPU, slowly, so on a smaller batch
BACKENDS = [("torch", 128), ("triton", 24)]


def _aligned(shape, gen, align=0.9):
    """Rows sharing a common direction: the per-sample gradients of early training are aligned,
    which is what makes the sum large and its rounding error large."""
    common = torch.randn(shape[1:], generator=gen, dtype=torch.float64)
    return align * common + (1 - align) * torch.randn(shape, generator=gen, dtype=torch.float64)


def _released_sum(model, x, Gt, backend, scope="forward", K=1):
    """The clipped sum dpfast releases (sigma = 0): SGD(lr=1) moves the parameters by sum / B.
    scope: what runs under autocast, the forward only or (a common loop) the whole step.
    K: rows per sample (multiplicity), sample-major."""
    B = x.shape[0] // K
    engine = PrivacyEngine(accountant="rdp", seed=0)
    m, opt, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                    noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=B,
                                    multiplicity=K, backend=backend)
    before = [p.detach().clone() for p in m.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        assert out.dtype == torch.bfloat16
        if scope == "all":
            (out.float() * Gt).sum().backward()  # dL/d(out) = Gt rounded to bf16
            opt.step()
    if scope == "forward":
        (out.float() * Gt).sum().backward()
        opt.step()
    return [(b - p.detach()).double() * B for b, p in zip(before, m.parameters())]


def _exact_clipped_sum(per_sample):
    """fp64: sum_i min(1, C / ||g_i||) g_i over the per-sample gradients (list per parameter)."""
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per_sample))
    s = (C / (norms + 1e-6)).clamp(max=1.0)
    assert (s < 1).all()  # every sample is clipped: the sum is as large as it gets
    return [(g * s.view(-1, *[1] * (g.dim() - 1))).sum(0) for g in per_sample]


def _error_in_units_of_C(released, exact):
    return torch.sqrt(sum((r - e).square().sum() for r, e in zip(released, exact))).item() / C


@pytest.mark.filterwarnings("ignore:noise_multiplier=0")
@pytest.mark.parametrize("scope", ["forward", "all"])
@pytest.mark.parametrize("backend, B", BACKENDS)
def test_linear_clipped_sum_is_exact_under_bf16(backend, B, scope):
    gen = torch.Generator().manual_seed(0)
    T, d, p = 16, 64, 64
    x, Gt = _aligned((B, T, d), gen).float(), _aligned((B, T, p), gen).float()
    model = nn.Linear(d, p)
    A, G = x.bfloat16().double(), Gt.bfloat16().double()  # what autocast feeds the layer
    exact = _exact_clipped_sum([torch.einsum("btp,btd->bpd", G, A), G.sum(1)])
    err = _error_in_units_of_C(_released_sum(model, x, Gt, backend, scope), exact)
    assert err < 1e-3, f"released clipped sum is {err:.3g} C away from the exact one"


@pytest.mark.filterwarnings("ignore:noise_multiplier=0")
@pytest.mark.parametrize("scope", ["forward", "all"])
@pytest.mark.parametrize("backend, B", BACKENDS)
def test_conv_clipped_sum_is_exact_under_bf16(backend, B, scope):
    gen = torch.Generator().manual_seed(1)
    cin, cout, H = 8, 16, 6
    x, Gt = _aligned((B, cin, H, H), gen).float(), _aligned((B, cout, H, H), gen).float()
    model = nn.Conv2d(cin, cout, 3, padding=1)
    xb, G = x.bfloat16().double(), Gt.bfloat16().double()
    cols = nn.functional.unfold(xb, 3, padding=1)  # (B, cin*9, H*H)
    gw = torch.einsum("bcl,bjl->bcj", G.flatten(2), cols).reshape(-1, cout, cin, 3, 3)
    exact = _exact_clipped_sum([gw, G.sum((2, 3))])
    err = _error_in_units_of_C(_released_sum(model, x, Gt, backend, scope), exact)
    assert err < 1e-3, f"released clipped sum is {err:.3g} C away from the exact one"


@pytest.mark.filterwarnings("ignore:noise_multiplier=0")
def test_norms_are_exact_when_backward_runs_under_autocast():
    # the per-sample norms (hence the clip factors) must not be computed by autocast bf16 matmuls
    gen = torch.Generator().manual_seed(2)
    x, Gt = _aligned((8, 16, 32), gen).float(), _aligned((8, 16, 32), gen).float()
    model = nn.Linear(32, 32)
    engine = PrivacyEngine(accountant="rdp", seed=0)
    m, opt, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                    noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=8,
                                    backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # mean over the 8 samples (the engine's default loss_reduction): per-sample gradients of Gt
        (m(x).float() * Gt).flatten(1).sum(1).mean().backward()
        opt.step()
    A, G = x.bfloat16().double(), Gt.bfloat16().double()
    exact = torch.sqrt(torch.einsum("btp,btd->bpd", G, A).flatten(1).square().sum(1)
                       + G.sum(1).square().sum(1))
    torch.testing.assert_close(opt.last_norms.double(), exact, rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore:noise_multiplier=0")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_conv_clipped_sum_is_exact_with_multiplicity(backend):
    # K = 3 rows per sample: each sample's rows are clipped together, by one factor
    B, K, cin, cout, H = 8, 3, 4, 8, 5
    gen = torch.Generator().manual_seed(3)
    x, Gt = _aligned((B * K, cin, H, H), gen).float(), _aligned((B * K, cout, H, H), gen).float()
    model = nn.Conv2d(cin, cout, 3, padding=1)
    xb, G = x.bfloat16().double(), Gt.bfloat16().double()
    cols = nn.functional.unfold(xb, 3, padding=1)
    gw = torch.einsum("bcl,bjl->bcj", G.flatten(2), cols).reshape(B, K, cout, cin, 3, 3).sum(1)
    exact = _exact_clipped_sum([gw, G.sum((2, 3)).reshape(B, K, cout).sum(1)])
    err = _error_in_units_of_C(_released_sum(model, x, Gt, backend, K=K), exact)
    assert err < 1e-3, f"released clipped sum is {err:.3g} C away from the exact one"
