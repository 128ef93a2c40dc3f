"""Samplers against the exact denoiser of Gaussian data, and classifier-free guidance."""
import pytest
import torch

from dpfast.diffusion.samplers import ddim_sampler, edm_sampler, guided, sample_images, sigma_schedule


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser E[x0 | x] for x0 ~ N(mu_y, s^2 I): mu + s^2 / (s^2 + sigma^2) (x - mu)."""

    def __init__(self, s=0.5, num_classes=2):
        super().__init__()
        self.s, self.num_classes = s, num_classes
        self.means = torch.tensor([-0.5, 0.5, 0.0])  # the last one: the null label's mean

    def forward(self, x, sigma, labels=None):
        mu = torch.zeros(len(x)) if labels is None else self.means[labels]
        mu = mu.view(-1, 1, 1, 1).to(x)
        w = (self.s ** 2 / (self.s ** 2 + sigma.to(x) ** 2)).view(-1, 1, 1, 1)
        return mu + w * (x - mu)


def test_schedule_endpoints():
    s = sigma_schedule(50, 0.002, 80.0, 7.0)
    assert s[0].item() == pytest.approx(80.0) and s[-1].item() == pytest.approx(0.002)
    assert (s[1:] < s[:-1]).all()


@pytest.mark.parametrize("sampler, kw", [
    (ddim_sampler, dict(num_steps=100)),
    (edm_sampler, dict(num_steps=40)),
    (edm_sampler, dict(num_steps=60, S_churn=30.0)),
    (ddim_sampler, dict(num_steps=400, stochastic=True)),
])
def test_samplers_recover_the_data_distribution(sampler, kw):
    d = GaussianDenoiser(s=0.5)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 1, 4, 4, generator=g)
    labels = torch.tensor([0, 1]).repeat(1000)
    x = sampler(d, z, labels, generator=g, **kw)
    for k, mu in ((0, -0.5), (1, 0.5)):
        xs = x[labels == k]
        # 16k values per class: standard errors ~0.004 (mean) and ~0.003 (std); the tolerance also
        # covers the discretisation error of the sampler
        assert xs.mean().item() == pytest.approx(mu, abs=0.02)
        assert xs.std().item() == pytest.approx(0.5, abs=0.03)


def test_guidance_combines_conditional_and_null():
    d = GaussianDenoiser(num_classes=2)
    x = torch.randn(6, 1, 2, 2)
    sigma = torch.full((6,), 1000.0)  # D ~ mu: the guided output is (1 + w) mu_y - w mu_null
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    out = guided(d, 2.0)(x, sigma, labels)
    expect = 3 * d.means[labels] - 2 * d.means[2]
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), expect, atol=1e-3, rtol=0)
    torch.testing.assert_close(guided(d, 0.0)(x, sigma, labels), d(x, sigma, labels))


def test_sample_images_is_deterministic_and_batched():
    d = GaussianDenoiser()
    labels = torch.tensor([0, 1, 1, 0, 1])
    a = sample_images(d, 5, (1, 3, 3), labels=labels, num_steps=5, batch_size=2, seed=3)
    b = sample_images(d, 5, (1, 3, 3), labels=labels, num_steps=5, batch_size=2, seed=3)
    assert a.shape == (5, 1, 3, 3) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
