"""A whole private U-Net step with backend="triton" (kernels run under TRITON_INTERPRET=1 on CPU)
equals the torch backend: same per-sample norms, same update."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from dpfast import PrivacyEngine


class TinyUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(3, 8)
        self.t = nn.Linear(8, 8)
        self.inp = nn.Conv2d(1, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.out = nn.Conv2d(16, 1, 3, padding=2, dilation=2)

    def forward(self, x, y):
        h0 = F.silu(self.gn(self.inp(x))) + self.t(self.emb(y))[:, :, None, None]
        h = self.down(h0)                                          # (N, 8, 4, 4)
        seq = h.flatten(2).transpose(1, 2)                         # (N, 16, 8)
        q, k, v = self.qkv(seq).chunk(3, dim=-1)
        seq = seq + self.proj(F.scaled_dot_product_attention(q, k, v))
        h = seq.transpose(1, 2).reshape(h.shape)
        return self.out(torch.cat([self.up(h), h0], dim=1))


def _step(backend, K, method):
    torch.manual_seed(0)
    model = TinyUNet()
    g = torch.Generator().manual_seed(1)
    B = 3
    x = torch.randn(B * K, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (B * K,), generator=g)
    before = [p.detach().clone() for p in model.parameters()]
    engine = PrivacyEngine(accountant="rdp", seed=5)
    m, o, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                  noise_multiplier=0.5, max_grad_norm=0.05, multiplicity=K, expected_batch_size=B,
                                  backend=backend, norm_method=method)
    m(x, y).square().flatten(1).mean(1).mean().backward()
    o.step()
    return o.last_norms, torch.cat([(b - p.detach()).flatten() for b, p in zip(before, m.parameters())])


@pytest.mark.parametrize("K,method", [(1, "auto"), (2, "direct"), (2, "ghost")])
def test_triton_backend_step_equals_torch_backend(K, method):
    n_torch, upd_torch = _step("torch", K, method)
    n_triton, upd_triton = _step("triton", K, method)
    torch.testing.assert_close(n_triton, n_torch, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(upd_triton, upd_torch, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("K", [1, 2])
def test_materialized_convs_by_the_triton_kernel_release_what_the_torch_backend_does(K, monkeypatch):
    """norm_method="materialize" with the Triton per-sample-gradient kernel as the only way to form a
    conv's per-sample gradients: the same norms and update as the torch backend's library calls."""
    from dpfast.rules.conv import ConvRule

    n_torch, upd_torch = _step("torch", K, "materialize")
    orig = ConvRule.psg_variants
    monkeypatch.setattr(ConvRule, "psg_variants", lambda self, site, tape: tuple(
        v for v in orig(self, site, tape) if v == "triton") or orig(self, site, tape))
    seen = []
    real = ConvRule._per_sample_weight_grads

    def spy(self, site, tape, samples=None):
        seen.append((site.name, site.variant))
        return real(self, site, tape, samples)

    monkeypatch.setattr(ConvRule, "_per_sample_weight_grads", spy)
    n_triton, upd_triton = _step("triton", K, "materialize")
    # every non-transposed 2-D conv took the kernel; the transposed one has no kernel and keeps "rows"
    assert {n for n, v in seen if v == "triton"} == {"inp", "down", "out"}, seen
    assert {v for n, v in seen if n == "up"} == {"rows"}, seen
    torch.testing.assert_close(n_triton, n_torch, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(upd_triton, upd_torch, rtol=1e-4, atol=1e-6)
