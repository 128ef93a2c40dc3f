"""Samplers for an EDM denoiser D(x, sigma, labels): DDIM (DPDM's default) and EDM's Heun sampler
with optional stochastic churn, both with classifier-free guidance.

Noise levels follow EDM's schedule sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) -
sigma_max^(1/rho)))^rho, with DPDM's sigma_min = 0.002, sigma_max = 80, rho = 7.
"""
from __future__ import annotations

import math

import torch

from .edm import EDMPrecond


def sigma_schedule(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                   rho: float = 7.0, device=None) -> torch.Tensor:
    """(num_steps,) decreasing noise levels from sigma_max to sigma_min (float64 for accuracy)."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    denom = max(num_steps - 1, 1)
    return (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def guided(denoiser: EDMPrecond, guidance: float):
    """Classifier-free guidance in DPDM's form: (1 + w) D(x | y) - w D(x | null).

    The conditional and unconditional evaluations run as one batch of 2N rows.
    """
    null = denoiser.num_classes

    def denoise(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if guidance == 0 or labels is None or null == 0:
            return denoiser(x, sigma, labels)
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]),
                        torch.cat([labels, torch.full_like(labels, null)]))
        cond, uncond = both.chunk(2)
        return (1 + guidance) * cond - guidance * uncond

    return denoise


@torch.no_grad()
def ddim_sampler(denoiser: EDMPrecond, latents: torch.Tensor, class_labels: torch.Tensor | None = None,
                 num_steps: int = 50, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0, guidance: float = 0.0, stochastic: bool = False,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM as the Euler method on the probability-flow ODE dx/dsigma = (x - D) / sigma (DPDM's
    `ddim_sampler`): num_steps - 1 Euler steps down to sigma_min, then one final denoising.
    `stochastic=True` is the Euler-Maruyama step of the reverse SDE instead.

    latents: (N, C, H, W) standard normal; returns images in about [-1, 1].
    """
    denoise = guided(denoiser, guidance)
    sigmas = sigma_schedule(num_steps, sigma_min, sigma_max, rho, latents.device)
    x = latents.to(torch.float32) * sigmas[0].float()
    n = x.shape[0]
    for s0, s1 in zip(sigmas[:-1], sigmas[1:]):
        d = denoise(x, s0.float().expand(n), class_labels)
        dt = float(s1 - s0)
        if stochastic:
            x = x + 2 * dt * (x - d) / float(s0)
            x = x + math.sqrt(2 * abs(dt) * float(s0)) * torch.randn(
                x.shape, generator=generator, device=x.device)
        else:
            x = x + dt * (x - d) / float(s0)
    return denoise(x, sigmas[-1].float().expand(n), class_labels)


@torch.no_grad()
def edm_sampler(denoiser: EDMPrecond, latents: torch.Tensor, class_labels: torch.Tensor | None = None,
                num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
                rho: float = 7.0, guidance: float = 0.0, S_churn: float = 0.0, S_min: float = 0.0,
                S_max: float = float("inf"), S_noise: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """EDM Algorithm 2: Heun's 2nd-order method, stochastic when S_churn > 0 (deterministic at 0).
    Uses 2 * num_steps - 1 denoiser evaluations."""
    denoise = guided(denoiser, guidance)
    sigmas = sigma_schedule(num_steps, sigma_min, sigma_max, rho, latents.device)
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    x_next = latents.to(torch.float64) * sigmas[0]
    n = latents.shape[0]

    def d_of(x, s):
        return denoise(x.float(), torch.full((n,), float(s), device=x.device), class_labels).double()

    for i, (s0, s1) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= s0 <= S_max else 0.0
        s_hat = s0 + gamma * s0
        if gamma > 0:
            eps = torch.randn(x_cur.shape, generator=generator, device=x_cur.device, dtype=torch.float64)
            x_hat = x_cur + (s_hat ** 2 - s0 ** 2).sqrt() * S_noise * eps
        else:
            x_hat = x_cur
        d_cur = (x_hat - d_of(x_hat, s_hat)) / s_hat
        x_next = x_hat + (s1 - s_hat) * d_cur
        if i < num_steps - 1:  # 2nd-order correction, except on the last step to sigma = 0
            d_prime = (x_next - d_of(x_next, s1)) / s1
            x_next = x_hat + (s1 - s_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.float()


def sample_images(denoiser: EDMPrecond, num: int, image_shape, labels: torch.Tensor | None = None,
                  sampler: str = "ddim", num_steps: int | None = None, guidance: float = 0.0,
                  batch_size: int = 256, seed: int = 0, device="cpu", **kwargs) -> torch.Tensor:
    """Draws `num` images (N, C, H, W) in [-1, 1]; labels (N,) or None for an unconditional model.

    Latents come from a generator seeded with `seed`, so the same call gives the same images.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    fn = {"ddim": ddim_sampler, "edm": edm_sampler}[sampler]
    if num_steps is not None:
        kwargs["num_steps"] = num_steps
    out = []
    was_training = denoiser.training
    denoiser.eval()
    for start in range(0, num, batch_size):
        m = min(batch_size, num - start)
        z = torch.randn((m, *image_shape), generator=gen, device=device)
        y = None if labels is None else labels[start:start + m].to(device)
        out.append(fn(denoiser, z, y, guidance=guidance, generator=gen, **kwargs).clamp(-1, 1).cpu())
    denoiser.train(was_training)
    return torch.cat(out) if out else torch.empty((0, *image_shape))
