"""EDM preconditioning and DPDM's training loss with noise multiplicity.

Karras et al. (EDM) write the denoiser as D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) with
    c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = ln(sigma) / 4,
and train it with the weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2, which makes the loss
of F unit-scale at every noise level. DPDM keeps this and samples ln sigma ~ N(P_mean, P_std^2) with
P_mean = -1.2, P_std = 1.2 and sd = sqrt(1/3), the standard deviation of data uniform on [-1, 1]
(images are scaled to [-1, 1]).

Noise multiplicity (DPDM): each image is used K times, each time with its own sigma and noise, and
the per-sample gradient is the mean of its K row gradients, so the K rows lower the variance of the
gradient before clipping at no privacy cost. Rows are laid out sample-major (rows i*K .. i*K+K-1 are
image i), which is the layout the engine's `multiplicity=K` expects.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

SIGMA_DATA = math.sqrt(1.0 / 3.0)


class EDMPrecond(nn.Module):
    """Wraps a network F(x, c_noise, labels) into the EDM denoiser D(x, sigma, labels)."""

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    @property
    def num_classes(self) -> int:
        return getattr(self.net, "num_classes", 0)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, C, H, W); sigma: (N,) or a scalar; class_labels: (N,) long or None."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        sigma = sigma.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1.0 / (sigma ** 2 + sd2).sqrt()
        c_noise = sigma.log().flatten() / 4.0
        return c_skip * x + c_out * self.net(c_in * x, c_noise, class_labels)


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def sample_sigmas(n: int, p_mean: float = -1.2, p_std: float = 1.2,
                  generator: torch.Generator | None = None, device=None,
                  sigma_range: tuple[float, float] | None = None,
                  bias: tuple[float, float, float] | None = None) -> torch.Tensor:
    """ln sigma ~ N(p_mean, p_std^2); returns (n,).

    sigma_range (lo, hi): the same distribution conditioned on lo <= sigma <= hi (inverse-CDF
    sampling, so no draw is wasted). A phase that trains on a range of noise levels minimises the
    EDM loss restricted to it: the weight lambda(sigma) is unchanged, the density renormalised.
    bias (lo, hi, w): a mixture that draws with probability w from the distribution restricted to
    [lo, hi] and otherwise from the whole one (DP-Diffusion's biased noise-level sampling, which
    spends more of the private gradient on the noise levels that shape an image). Both combine: the
    mixture is then restricted to sigma_range.
    """
    def truncated(lo, hi, size):
        a = torch.special.ndtr(torch.tensor((math.log(lo) - p_mean) / p_std, dtype=torch.float64))
        b = torch.special.ndtr(torch.tensor((math.log(hi) - p_mean) / p_std, dtype=torch.float64))
        u = torch.rand(size, generator=generator, device=device, dtype=torch.float64)
        z = torch.special.ndtri((a + (b - a) * u.cpu()).clamp(1e-12, 1 - 1e-12)).to(device)
        return (p_mean + p_std * z).exp().float()

    lo, hi = sigma_range if sigma_range is not None else (0.0, math.inf)
    if bias is None and sigma_range is None:
        z = torch.randn(n, generator=generator, device=device)
        return (p_mean + p_std * z).exp()
    full = truncated(max(lo, 1e-30), hi, n)
    if bias is None:
        return full
    b_lo, b_hi, w = max(bias[0], lo), min(bias[1], hi), bias[2]
    if b_lo >= b_hi:
        return full
    pick = torch.rand(n, generator=generator, device=device) < w
    return torch.where(pick, truncated(b_lo, b_hi, n), full)


def drop_labels(labels: torch.Tensor, p: float, null_label: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by the null label with probability p (classifier-free guidance training)."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def edm_draws(images: torch.Tensor, labels: torch.Tensor | None, multiplicity: int = 1, *,
              p_mean: float = -1.2, p_std: float = 1.2, label_dropout: float = 0.1,
              augment: Callable[..., torch.Tensor] | None = None, generator: torch.Generator | None = None,
              generators: list[torch.Generator] | None = None, num_classes: int = 0,
              sigma_range: tuple[float, float] | None = None,
              sigma_bias: tuple[float, float, float] | None = None, coins: int = 0) -> tuple:
    """The random inputs of a batch's EDM rows: (x, y, sigma, noise, u). x: (B*K, C, H, W), the
    images repeated sample-major and augmented per row; y: (B*K,) labels after per-sample dropout
    (None when unconditional); sigma: (B*K,); noise: like x; u: (B*K, coins) uniforms for the
    caller (None when coins = 0).

    ``generator``: one stream for the whole batch, drawn in batch order (public or non-private
    phases). ``generators``: one per sample (:func:`dpfast.random.record_generators`): sample i's
    draws all come from ``generators[i]``, in the same order as a one-sample batch would take them
    from ``generator``, so they do not depend on the rest of the batch. DP-SGD needs that: see
    record_generators. ``augment`` is then called with ``generator=`` (make_augment's functions take
    it); one that cannot take it is refused rather than drawing from a stream of its own."""
    if generators is not None:
        if len(generators) != len(images):
            raise ValueError(f"{len(generators)} generators for {len(images)} samples: pass one per sample")
        if augment is not None and not getattr(augment, "takes_generator", False):
            raise ValueError("per-sample generators need an augment that takes generator= "
                             "(dpfast.diffusion.augment.make_augment); this one would draw from its own stream")
        if len(images):
            parts = [edm_draws(images[i:i + 1], None if labels is None else labels[i:i + 1], multiplicity,
                               p_mean=p_mean, p_std=p_std, label_dropout=label_dropout, augment=augment,
                               generator=g, num_classes=num_classes, sigma_range=sigma_range,
                               sigma_bias=sigma_bias, coins=coins) for i, g in enumerate(generators)]
            return tuple(None if parts[0][j] is None else torch.cat([p[j] for p in parts])
                         for j in range(len(parts[0])))
    k = multiplicity
    x = images.repeat_interleave(k, dim=0)                      # sample-major (B*K, C, H, W)
    if augment is not None:
        x = augment(x, generator=generator) if getattr(augment, "takes_generator", False) else augment(x)
    y = None
    if labels is not None and num_classes > 0:
        labels = torch.where(labels < 0, torch.full_like(labels, num_classes), labels)
        y = drop_labels(labels, label_dropout, num_classes, generator)
        y = y.repeat_interleave(k, dim=0)
    sigma = sample_sigmas(x.shape[0], p_mean, p_std, generator, x.device, sigma_range, sigma_bias).to(x.dtype)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    u = torch.rand(x.shape[0], coins, generator=generator, device=x.device) if coins else None
    return x, y, sigma, noise, u


def edm_loss_rows(denoiser: EDMPrecond, images: torch.Tensor, labels: torch.Tensor | None,
                  multiplicity: int = 1, p_mean: float = -1.2, p_std: float = 1.2,
                  label_dropout: float = 0.1,
                  augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  generator: torch.Generator | None = None, num_classes: int | None = None,
                  sigma_data: float | None = None, sigma_range: tuple[float, float] | None = None,
                  sigma_bias: tuple[float, float, float] | None = None,
                  generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Per-row EDM loss with noise multiplicity K: returns (B*K,), the mean over pixels of each row.

    images: (B, C, H, W) in [-1, 1]; labels: (B,) long or None (unconditional).
    Labels are dropped per *sample* (all K rows of an image share the decision, as in DPDM), then
    repeated. `augment`, if given, is applied per row (augmentation multiplicity): each of the K rows
    gets its own augmentation and its own noise level. All randomness comes from `generator`, or
    for private training from `generators`, one per sample (see :func:`edm_draws`: with one stream
    in batch order, a record's presence would change every other record's draws). `num_classes`
    and `sigma_data` default to the denoiser's (pass them when the denoiser is wrapped, e.g. by
    DDP). Labels < 0 (public images without one) are the null label. sigma_range / sigma_bias: see
    sample_sigmas.
    """
    num_classes = denoiser.num_classes if num_classes is None else num_classes
    sigma_data = denoiser.sigma_data if sigma_data is None else sigma_data
    x, y, sigma, noise, _ = edm_draws(images, labels, multiplicity, p_mean=p_mean, p_std=p_std,
                                      label_dropout=label_dropout, augment=augment, generator=generator,
                                      generators=generators, num_classes=num_classes,
                                      sigma_range=sigma_range, sigma_bias=sigma_bias)
    sig = sigma.reshape(-1, 1, 1, 1)
    denoised = denoiser(x + sig * noise, sigma, y)
    weight = edm_loss_weight(sig, sigma_data)
    return (weight * (denoised - x) ** 2).flatten(1).mean(dim=1)
