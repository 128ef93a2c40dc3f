"""Models and the diffusion workload the benchmark runs on them.

Every model is built through a :class:`ModelSpec` and obeys one contract: ``model(x, t)`` with
``x: (N, C, H, W)`` and integer timesteps ``t: (N,)`` returns the epsilon prediction, shaped like ``x``.
Heavy imports (diffusers, ``dpfast.diffusion.unet``) happen inside the factories, so listing models
or running the ``tiny`` CI model never pays for them, and a model whose code is missing becomes an
``unavailable`` row instead of a crash.

Built-in names:
  tiny      4k params, 1x8x8, pure torch: conv, GroupNorm, time-embedding MLP, stride-2 down,
            upsample, self-attention through Linear layers. For CI and tests.
  small     diffusers UNet2DModel, 1x32x32, channels 32/64/64, attention at the middle level, 1.6M
            (the ``small`` model of shared/ANCHORS.md).
  ddpm      diffusers UNet2DModel, 3x32x32, channels 128/256/256/256, 35.7M (DDPM CIFAR-10 size).
  celeba64  diffusers UNet2DModel, 3x64x64, channels 128/256/256/256/512, attention at 16x16, 78.7M
            (the DDIM CelebA-64 configuration).
  dpdm28    DPDM DDPM++ U-Net from dpfast.diffusion.unet, 1x28x28 (MNIST / Fashion-MNIST), 1.75M.
  dpdm32    the same architecture at 3x32x32 (CIFAR-10 / CelebA-32), 1.75M.
  demo14    the U-Net of the README's demo (``dpfast train --preset demo``), 1x14x14, nf=16.
  pkg.mod:factory   a user model: ``factory()`` returns an ``nn.Module`` (with an ``input_shape``
            attribute), a ``(module, (C, H, W))`` pair, or a diffusers ``UNet2DModel``.
"""
from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass
from typing import Callable, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class ModelUnavailable(RuntimeError):
    """The model's code (or an optional package it needs) is not installed here."""


@dataclass
class ModelSpec:
    name: str
    input_shape: Tuple[int, int, int]  # (C, H, W) of one row
    build: Callable[[], nn.Module]  # returns a fresh model obeying model(x, t) -> eps
    description: str = ""


# --------------------------------------------------------------------------------------------
# The workload: DDPM epsilon-prediction MSE, one loss per row, B samples x K rows, sample-major.
# --------------------------------------------------------------------------------------------

class DiffusionBatch:
    """A fixed batch of ``B`` clean samples repeated ``K`` times (rows ``i*K .. i*K+K-1`` belong to
    sample ``i``), with fresh timesteps and noise drawn on every step.

    The clean images are drawn once: data loading is not what we measure, and every engine sees the
    same data. Timesteps and noise are drawn per step because that is part of a real training step
    (and of the non-private baseline too, so ratios stay fair).
    """

    num_timesteps = 1000

    def __init__(self, input_shape, batch_size: int, multiplicity: int, device, seed: int = 0):
        self.batch_size, self.multiplicity = batch_size, multiplicity
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        x0 = torch.randn((batch_size, *input_shape), generator=self.generator, device=self.device)
        self.x0 = x0.repeat_interleave(multiplicity, dim=0)  # (B*K, C, H, W), sample-major
        betas = torch.linspace(1e-4, 0.02, self.num_timesteps, dtype=torch.float64)  # DDPM schedule
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float().to(self.device)

    @property
    def rows(self) -> int:
        return self.batch_size * self.multiplicity

    def sample(self):
        """Returns ``(x_t, t, eps)`` for all ``B*K`` rows: ``x_t: (B*K, C, H, W)``, ``t: (B*K,)``."""
        n = self.rows
        t = torch.randint(0, self.num_timesteps, (n,), generator=self.generator, device=self.device)
        eps = torch.randn(self.x0.shape, generator=self.generator, device=self.device)
        a = self.alphas_cumprod[t].view(n, 1, 1, 1)
        return a.sqrt() * self.x0 + (1 - a).sqrt() * eps, t, eps

    @staticmethod
    def loss_rows(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Per-row MSE, ``(N,)``, in fp32 even under bf16 autocast (as a real trainer would)."""
        return (eps_pred.float() - eps.float()).pow(2).flatten(1).mean(dim=1)


# --------------------------------------------------------------------------------------------
# Model factories
# --------------------------------------------------------------------------------------------

def _timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class TinyUNet(nn.Module):
    """A two-level U-Net small enough for CI that still has every layer kind a DP engine must
    handle in a diffusion model: 3x3 and stride-2 convs, GroupNorm, a time-embedding MLP, and
    self-attention whose q/k/v/out projections are Linear layers over H*W tokens."""

    input_shape = (1, 8, 8)

    def __init__(self, ch: int = 8, in_ch: int = 1, temb_dim: int = 16):
        super().__init__()
        self.temb_dim = temb_dim
        self.temb = nn.Sequential(nn.Linear(temb_dim, temb_dim), nn.SiLU(), nn.Linear(temb_dim, 2 * ch))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.norm_in = nn.GroupNorm(4, ch)
        self.down = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)
        self.norm_mid = nn.GroupNorm(4, 2 * ch)
        self.qkv = nn.Linear(2 * ch, 6 * ch)
        self.proj = nn.Linear(2 * ch, 2 * ch)
        self.up = nn.Conv2d(2 * ch, ch, 3, padding=1)
        self.conv_out = nn.Conv2d(2 * ch, in_ch, 3, padding=1)

    def forward(self, x, t):
        scale, shift = self.temb(_timestep_embedding(t, self.temb_dim)).chunk(2, dim=1)
        h0 = F.silu(self.norm_in(self.conv_in(x)) * (1 + scale[..., None, None]) + shift[..., None, None])
        h = F.silu(self.norm_mid(self.down(h0)))
        n, c, hh, ww = h.shape
        tokens = h.flatten(2).transpose(1, 2)  # (N, H*W, C)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        attn = F.scaled_dot_product_attention(q, k, v)
        h = h + self.proj(attn).transpose(1, 2).reshape(n, c, hh, ww)
        h = self.up(F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.conv_out(torch.cat([h, h0], dim=1))


class DiffusersEps(nn.Module):
    """Adapts a diffusers ``UNet2DModel`` (which returns an output object) to ``model(x, t) -> eps``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x, t).sample


def _diffusers_unet(**kwargs) -> nn.Module:
    try:
        from diffusers import UNet2DModel
    except ImportError as e:  # optional extra
        raise ModelUnavailable(f"diffusers is not installed ({e}); pip install diffusers") from e
    return DiffusersEps(UNet2DModel(**kwargs))


def _small():
    return _diffusers_unet(
        sample_size=32, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=2)


def _ddpm():
    return _diffusers_unet(
        sample_size=32, block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=2)


def _celeba64():
    # DDIM's CelebA-64 network: ch=128, ch_mult (1,2,2,2,4), attention at 16x16.
    return _diffusers_unet(
        sample_size=64, block_out_channels=(128, 256, 256, 256, 512),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=2)


class DPDMEps(nn.Module):
    """Adapts ``dpfast.diffusion.unet.DDPMpp`` (``x, c_noise, class_labels``) to ``model(x, t)``.
    The timestep stands in for the noise level, and labels are the null label: the cost of a step
    does not depend on either value, and the label Embedding still trains."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x, t.float())


def _dpdm(resolution: int, in_channels: int):
    # DPDM's DDPM++ settings (nf=32, ch_mult 1,2,2, 2 res blocks) with attention at the lowest
    # level: 7x7 for 28x28 as in DPDM, 8x8 for 32x32.
    def build():
        try:
            from dpfast.diffusion.unet import DDPMpp
        except ImportError as e:
            raise ModelUnavailable(f"dpfast.diffusion.unet is not available ({e})") from e
        return DPDMEps(DDPMpp(image_size=resolution, in_channels=in_channels,
                              attn_resolutions=(resolution // 4,)))
    return build


def _demo14():
    # the U-Net of `dpfast train --preset demo` (dpfast/diffusion/presets.py, _DEMO): 1x14x14, nf=16,
    # ch_mult (1, 2), one res block per level, no attention
    try:
        from dpfast.diffusion.unet import DDPMpp
    except ImportError as e:
        raise ModelUnavailable(f"dpfast.diffusion.unet is not available ({e})") from e
    return DPDMEps(DDPMpp(image_size=14, in_channels=1, nf=16, ch_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=()))


MODELS = {
    "tiny": ModelSpec("tiny", TinyUNet.input_shape, TinyUNet, "pure-torch CI U-Net, 4k params"),
    "small": ModelSpec("small", (1, 32, 32), _small, "diffusers UNet2DModel 32/64/64, 1.6M"),
    "ddpm": ModelSpec("ddpm", (3, 32, 32), _ddpm, "diffusers UNet2DModel 128/256/256/256, 35.7M"),
    "celeba64": ModelSpec("celeba64", (3, 64, 64), _celeba64, "diffusers UNet2DModel, DDIM CelebA-64, 78.7M"),
    "dpdm28": ModelSpec("dpdm28", (1, 28, 28), _dpdm(28, 1), "DPDM DDPM++ U-Net (dpfast), 1.75M"),
    "dpdm32": ModelSpec("dpdm32", (3, 32, 32), _dpdm(32, 3), "DPDM DDPM++ U-Net (dpfast), 1.75M"),
    "demo14": ModelSpec("demo14", (1, 14, 14), _demo14, "the README demo's DDPM++ U-Net (dpfast), 1x14x14"),
}


def _user_model(ref: str) -> ModelSpec:
    """``pkg.module:factory`` -> ModelSpec. Building once here is the only way to learn the input
    shape; the result is kept and handed out on the first ``build()`` so it is not wasted."""
    module_name, _, attr = ref.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ModelUnavailable(f"cannot load user model {ref!r}: {e}") from e

    def build_with_shape():
        out = factory()
        if isinstance(out, tuple):
            model, shape = out
        else:
            model, shape = out, getattr(out, "input_shape", None)
        config = getattr(model, "config", None)
        if shape is None and config is not None and hasattr(config, "sample_size"):
            size = config.sample_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            shape = (config.in_channels, *size)
            model = DiffusersEps(model)
        if shape is None:
            raise ModelUnavailable(
                f"user model {ref!r}: give the model an `input_shape` (C, H, W) attribute or "
                "return (model, (C, H, W)) from the factory")
        return model, tuple(shape)

    first = [build_with_shape()]
    return ModelSpec(ref, first[0][1], lambda: first.pop()[0] if first else build_with_shape()[0],
                     f"user model {ref}")


@functools.lru_cache(maxsize=None)  # a user model is imported (and built) once per run
def get_model_spec(name: str) -> ModelSpec:
    if name in MODELS:
        return MODELS[name]
    if ":" in name:
        return _user_model(name)
    raise ModelUnavailable(f"unknown model {name!r}; built-in: {', '.join(MODELS)}, or pkg.module:factory")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
