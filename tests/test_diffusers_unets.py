"""dpfast is exact on real diffusion code: diffusers' UNet2DModel (attention, class embedding) and
UNet2DConditionModel (cross-attention transformer blocks), in contiguous and channels_last formats.
(Opacus 1.6 silently returns zero per-sample gradients for channels_last Conv2d.)"""
from __future__ import annotations

import copy

import pytest
import torch

from dpfast import PrivacyEngine
from oracle import clipped_sum_oracle

diffusers = pytest.importorskip("diffusers")


def tiny_unet2d():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4, num_class_embeds=3).double()


def tiny_unet_cond():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, attention_head_dim=4, cross_attention_dim=8).double()


def rows_unet2d(K):
    def rows(model, x, t, y, noise):
        xr = x.repeat_interleave(K, 0) + noise[:, :K].flatten(0, 1)
        out = model(xr, t[:, :K].flatten(), class_labels=y.repeat_interleave(K, 0)).sample
        return (out - noise[:, :K].flatten(0, 1)).square().flatten(1).mean(1)
    return rows


def rows_cond(K):
    def rows(model, x, t, ctx, noise):
        xr = x.repeat_interleave(K, 0) + noise[:, :K].flatten(0, 1)
        out = model(xr, t[:, :K].flatten(), encoder_hidden_states=ctx.repeat_interleave(K, 0)).sample
        return (out - noise[:, :K].flatten(0, 1)).square().flatten(1).mean(1)
    return rows


def _inputs(B, cond, K=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (B, K), generator=g)
    noise = torch.randn(B, K, 1, 8, 8, generator=g, dtype=torch.float64)
    third = (torch.randn(B, 5, 8, generator=g, dtype=torch.float64) if cond
             else torch.randint(0, 3, (B,), generator=g))
    return x, t, third, noise


@pytest.mark.parametrize("kind", ["unet2d", "cond"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_diffusers_unet_step_is_exact(kind, channels_last):
    K = 2
    model = tiny_unet2d() if kind == "unet2d" else tiny_unet_cond()
    rows_fn = rows_unet2d(K) if kind == "unet2d" else rows_cond(K)
    inputs = _inputs(3, kind == "cond", K)
    _, norms = clipped_sum_oracle(model, rows_fn, inputs, K, C=1e9)
    C = norms.median().item()
    want, _ = clipped_sum_oracle(model, rows_fn, inputs, K, C)
    m = copy.deepcopy(model)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
        inputs = (inputs[0].contiguous(memory_format=torch.channels_last), *inputs[1:])
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    engine = PrivacyEngine(accountant="rdp", seed=0)
    m, o, _ = engine.make_private(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=1.0),
                                  noise_multiplier=0.0, max_grad_norm=C, multiplicity=K, expected_batch_size=3,
                                  backend="torch")
    rows_fn(m, *inputs).mean().backward()
    o.step()
    torch.testing.assert_close(o.last_norms, norms, rtol=1e-9, atol=0)
    # to_k.bias has a mathematically zero gradient (softmax ignores a shift of all keys): compare each
    # tensor relative to its own scale, and to the model's largest gradient for such tensors
    top = max(w.abs().max() for w in want.values()) / 3
    frozen = []
    for n, p in m.named_parameters():
        got = before[n] - p.detach()
        w = want[n] / 3
        scale = max(w.abs().max(), 1e-6 * top)
        assert (got - w).abs().max() <= 1e-9 * scale, n
        if w.abs().max() > 1e-6 * top and got.abs().max() == 0:
            frozen.append(n)
    assert not frozen, f"silently frozen: {frozen}"
