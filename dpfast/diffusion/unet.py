"""DDPM++ U-Net (the NCSN++ "biggan" variant) at DPDM's sizes.

The architecture follows DPDM's `model/ncsnpp.py` (itself from Song et al.'s score_sde): BigGAN-style
residual blocks that also do the down/up-sampling, GroupNorm + SiLU, a single-head self-attention
block at the resolutions listed in `attn_resolutions`, `skip_rescale` (residual sums divided by
sqrt 2), a positional (or Fourier) embedding of the noise level passed through a two-layer MLP,
and class conditioning by an `nn.Embedding` added to the noise embedding. The embedding has
`num_classes + 1` rows: the last row is the "null" label used for label dropout during training and
for the unconditional branch of classifier-free guidance.

With DPDM's settings for 28x28 (nf=32, ch_mult=(1, 2, 2), 2 res blocks, attention at 7) this has
1,753,345 trainable parameters (DPDM reports ~1.75M).

Written for the DP engine: every trainable module is an nn.Conv2d / nn.Linear / nn.GroupNorm /
nn.Embedding called once per forward with the batch as dim 0, no raw nn.Parameter, no weight read
outside its module, and nothing mixes samples. The score_sde "NIN" layers (einsum over a raw
parameter) are 1x1 nn.Conv2d here, and the attention's q/k/v come from one 1x1 conv (C -> 3C), which
has the same parameter count as three separate NINs and is one module call instead of three.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _variance_scaling_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """score_sde's `default_init`: fan-avg uniform variance scaling (Xavier uniform when scale=1).

    scale=0 is replaced by 1e-10, as in score_sde, so zero-initialised output layers still have a
    well-defined (tiny) weight and the model starts as the identity skip of the EDM preconditioning.
    """
    scale = 1e-10 if scale == 0 else scale
    fan_in = weight.shape[1] * weight[0][0].numel()
    fan_out = weight.shape[0] * weight[0][0].numel()
    bound = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2.0))
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def conv(in_ch: int, out_ch: int, kernel_size: int = 3, init_scale: float = 1.0) -> nn.Conv2d:
    layer = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2)
    _variance_scaling_(layer.weight, init_scale)
    nn.init.zeros_(layer.bias)
    return layer


def linear(in_features: int, out_features: int, init_scale: float = 1.0) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    _variance_scaling_(layer.weight, init_scale)
    nn.init.zeros_(layer.bias)
    return layer


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


def positional_embedding(c_noise: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """DDPM's sinusoidal embedding of a scalar per row. c_noise: (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_positions) / (half - 1)
                      * torch.arange(half, dtype=torch.float32, device=c_noise.device))
    args = c_noise.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of c_noise with fixed (non-trainable) frequencies, kept in a buffer
    so that the DP engine never sees them as parameters."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        args = c_noise.float()[:, None] * (2 * math.pi * self.freqs[None, :])
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResnetBlock(nn.Module):
    """BigGAN-style residual block of DDPM++; `down`/`up` resample both paths by 2 (average pool /
    nearest), which is what score_sde does with fir=False."""

    def __init__(self, in_ch: int, out_ch: int | None = None, temb_dim: int = 128, up: bool = False,
                 down: bool = False, dropout: float = 0.0, skip_rescale: bool = True,
                 init_scale: float = 0.0):
        super().__init__()
        out_ch = out_ch or in_ch
        self.up, self.down, self.skip_rescale = up, down, skip_rescale
        self.GroupNorm_0 = group_norm(in_ch)
        self.Conv_0 = conv(in_ch, out_ch)
        self.Dense_0 = linear(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv(out_ch, out_ch, init_scale=init_scale)
        self.Conv_2 = conv(in_ch, out_ch, kernel_size=1) if (in_ch != out_ch or up or down) else None

    def _resample(self, t: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(t, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(t, 2)
        return t

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.GroupNorm_0(x))
        h = self._resample(h)
        x = self._resample(x)
        h = self.Conv_0(h)
        h = h + self.Dense_0(F.silu(temb))[:, :, None, None]
        h = F.silu(self.GroupNorm_1(h))
        h = self.Conv_1(self.Dropout_0(h))
        if self.Conv_2 is not None:
            x = self.Conv_2(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each sample (score_sde AttnBlockpp)."""

    def __init__(self, channels: int, skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        self.skip_rescale = skip_rescale
        self.GroupNorm_0 = group_norm(channels)
        self.qkv = conv(channels, 3 * channels, kernel_size=1)
        self.proj_out = conv(channels, channels, kernel_size=1, init_scale=init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        qkv = self.qkv(self.GroupNorm_0(x)).reshape(b, 3, c, hh * ww).transpose(2, 3)  # (B, 3, HW, C)
        q, k, v = qkv[:, 0:1], qkv[:, 1:2], qkv[:, 2:3]                                # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)                                    # scale C^-1/2
        h = self.proj_out(h[:, 0].transpose(1, 2).reshape(b, c, hh, ww))
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class DDPMpp(nn.Module):
    """DDPM++ U-Net: (x, c_noise, class_labels) -> output of the same shape as x.

    x: (N, in_channels, H, W); c_noise: (N,); class_labels: (N,) long in [0, num_classes], where the
    value num_classes is the null label (or None for an unconditional model, num_classes=0).
    """

    def __init__(self, image_size: int = 28, in_channels: int = 1, out_channels: int | None = None,
                 num_classes: int = 10, nf: int = 32, ch_mult=(1, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions=(7,), dropout: float = 0.0, skip_rescale: bool = True,
                 embedding_type: str = "positional", fourier_scale: float = 16.0,
                 init_scale: float = 0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.nf, self.num_classes = nf, num_classes
        self.embedding_type = embedding_type
        self.attn_resolutions = tuple(attn_resolutions)
        resolutions = [image_size // 2 ** i for i in range(len(ch_mult))]
        temb_dim = 4 * nf

        if embedding_type == "fourier":
            self.fourier = FourierEmbedding(nf, fourier_scale)
        elif embedding_type != "positional":
            raise ValueError(f"embedding_type must be 'positional' or 'fourier', not {embedding_type!r}")
        # num_classes + 1 rows: the extra row is the null label for classifier-free guidance.
        self.label_embed = nn.Embedding(num_classes + 1, nf) if num_classes > 0 else None
        self.temb_0 = linear(nf, temb_dim)
        self.temb_1 = linear(temb_dim, temb_dim)

        block = dict(temb_dim=temb_dim, dropout=dropout, skip_rescale=skip_rescale,
                     init_scale=init_scale)
        attn = dict(skip_rescale=skip_rescale, init_scale=init_scale)
        # The down and up paths are flat lists; `_skip_after[i]` says whether down layer i's output
        # is kept for the skip connections (after each res block and its attention, and after each
        # downsampling block), as in score_sde.
        self.conv_in = conv(in_channels, nf)
        self.down = nn.ModuleList()
        self._skip_after: list[bool] = []
        skip_channels = [nf]
        ch = nf
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResnetBlock(ch, nf * mult, **block))
                self._skip_after.append(True)
                ch = nf * mult
                if resolutions[level] in self.attn_resolutions:
                    self._skip_after[-1] = False
                    self.down.append(AttnBlock(ch, **attn))
                    self._skip_after.append(True)
                skip_channels.append(ch)
            if level != len(ch_mult) - 1:
                self.down.append(ResnetBlock(ch, down=True, **block))
                self._skip_after.append(True)
                skip_channels.append(ch)

        self.mid = nn.ModuleList([ResnetBlock(ch, **block), AttnBlock(ch, **attn),
                                  ResnetBlock(ch, **block)])

        self.up = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResnetBlock(ch + skip_channels.pop(), nf * ch_mult[level], **block))
                ch = nf * ch_mult[level]
            if resolutions[level] in self.attn_resolutions:
                self.up.append(AttnBlock(ch, **attn))
            if level != 0:
                self.up.append(ResnetBlock(ch, up=True, **block))
        assert not skip_channels

        self.norm_out = group_norm(ch)
        self.conv_out = conv(ch, out_channels, init_scale=init_scale)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embedding_type == "fourier":
            emb = self.fourier(c_noise)
        else:
            emb = positional_embedding(c_noise, self.nf)
        if self.label_embed is not None:
            if class_labels is None:  # unconditional use of a conditional model: the null label
                class_labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long,
                                          device=x.device)
            emb = emb + self.label_embed(class_labels)
        temb = self.temb_1(F.silu(self.temb_0(emb)))

        hs = [self.conv_in(x)]
        h = hs[-1]
        for layer, keep in zip(self.down, self._skip_after):
            h = layer(h) if isinstance(layer, AttnBlock) else layer(h, temb)
            if keep:
                hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)
        for layer in self.up:
            if isinstance(layer, AttnBlock):
                h = layer(h)
            elif layer.up:
                h = layer(h, temb)
            else:
                h = layer(torch.cat([h, hs.pop()], dim=1), temb)
        assert not hs
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
