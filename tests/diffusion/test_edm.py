"""EDM preconditioning and DPDM's loss with noise multiplicity."""
import math

import pytest
import torch

from dpfast.diffusion.augment import make_augment, random_crop, random_flip
from dpfast.diffusion.edm import (SIGMA_DATA, EDMPrecond, drop_labels, edm_loss_rows, edm_loss_weight,
                                  sample_sigmas)
from dpfast.diffusion.unet import DDPMpp


class Recorder(torch.nn.Module):
    """A fake network that records what the preconditioning feeds it and returns a fixed output."""
    num_classes = 3

    def forward(self, x, c_noise, labels):
        self.seen = (x, c_noise, labels)
        return torch.full_like(x, 0.5)


def test_preconditioning_formulas():
    net = Recorder()
    d = EDMPrecond(net)
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.5, 1.0, 80.0], dtype=torch.float64)
    out = d(x, sigma, torch.arange(4))
    s = sigma.view(-1, 1, 1, 1)
    sd = math.sqrt(1 / 3)
    assert d.sigma_data == SIGMA_DATA == pytest.approx(sd)
    torch.testing.assert_close(net.seen[0], x / (s ** 2 + sd ** 2).sqrt())
    torch.testing.assert_close(net.seen[1], sigma.log() / 4)
    expect = sd ** 2 / (s ** 2 + sd ** 2) * x + s * sd / (s ** 2 + sd ** 2).sqrt() * 0.5
    torch.testing.assert_close(out, expect)
    # lambda(sigma) * c_out^2 = 1: the weighted loss is unit-scale in F's units at every sigma
    c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
    torch.testing.assert_close(edm_loss_weight(s) * c_out ** 2, torch.ones_like(s))


def test_loss_rows_match_a_direct_computation():
    torch.manual_seed(0)
    d = EDMPrecond(DDPMpp(image_size=8, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                          num_classes=3)).double()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 1, 2])
    K = 4
    rows = edm_loss_rows(d, x, y, multiplicity=K, label_dropout=0.5,
                         generator=torch.Generator().manual_seed(7))
    assert rows.shape == (3 * K,)
    # redo by hand with the same random stream: label drop, sigmas, noise (in that order)
    g = torch.Generator().manual_seed(7)
    yy = drop_labels(y, 0.5, 3, g).repeat_interleave(K)
    sigma = sample_sigmas(3 * K, generator=g).double()
    xr = x.repeat_interleave(K, dim=0)
    noise = torch.randn(xr.shape, generator=g, dtype=torch.float64)
    s = sigma.view(-1, 1, 1, 1)
    expect = (edm_loss_weight(s) * (d(xr + s * noise, sigma, yy) - xr) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(rows, expect)


def test_rows_are_sample_major_and_per_sample():
    """Rows i*K..i*K+K-1 belong to image i: changing image j leaves every other image's rows alone."""
    torch.manual_seed(0)
    d = EDMPrecond(DDPMpp(image_size=8, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                          num_classes=3)).double()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 1, 2])
    K = 3
    a = edm_loss_rows(d, x, y, multiplicity=K, generator=torch.Generator().manual_seed(1))
    x2 = x.clone()
    x2[1] = -x2[1]
    b = edm_loss_rows(d, x2, y, multiplicity=K, generator=torch.Generator().manual_seed(1))
    same = torch.ones(3 * K, dtype=torch.bool)
    same[K:2 * K] = False
    torch.testing.assert_close(a[same], b[same])
    assert not torch.allclose(a[~same], b[~same])


def test_sigma_distribution():
    # ln sigma ~ N(-1.2, 1.2^2); with n=200k the sample mean/std are within 0.01 with prob > 1 - 1e-9
    s = sample_sigmas(200_000, generator=torch.Generator().manual_seed(0)).double().log()
    assert s.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert s.std().item() == pytest.approx(1.2, abs=0.01)


def test_label_dropout_is_per_sample_and_at_rate_p():
    labels = torch.zeros(100_000, dtype=torch.long)
    out = drop_labels(labels, 0.1, 10, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) == {0, 10}
    assert (out == 10).double().mean().item() == pytest.approx(0.1, abs=0.005)  # ~5 sd
    assert drop_labels(labels, 0.0, 10) is labels

    class Spy(EDMPrecond):
        def forward(self, x, sigma, y=None):
            self.y = y
            return x
    d = Spy(Recorder())
    edm_loss_rows(d, torch.zeros(50, 1, 2, 2), torch.zeros(50, dtype=torch.long), multiplicity=4,
                  label_dropout=0.5, generator=torch.Generator().manual_seed(0))
    per_sample = d.y.view(50, 4)
    assert (per_sample == per_sample[:, :1]).all()          # K rows share the decision
    assert 0 < (per_sample[:, 0] == 3).sum() < 50


def test_augmentations_are_per_row_and_shape_preserving():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5).repeat(50, 1, 1, 1)
    f = random_flip(x, g)
    flipped = (f != x).flatten(1).any(1)
    assert 0 < flipped.sum() < len(x)
    torch.testing.assert_close(f[flipped], x[flipped].flip(-1))
    c = random_crop(x, 2, g)
    assert c.shape == x.shape
    assert (c != x).flatten(1).any(1).sum() > 0
    assert torch.equal(random_crop(x, 0, g), x)
    assert make_augment("none") is None
    with pytest.raises(ValueError, match="augment must be one of"):
        make_augment("rotate")
    assert make_augment("flip+crop", 1, g)(x).shape == x.shape
