"""Per-row augmentations for augmentation multiplicity (De et al. 2022; Ghalebikesabi et al. 2023).

With multiplicity K each sample appears as K rows; augmenting each row independently before the
loss means the per-sample gradient (the mean of its K rows) averages over K augmentations, which
lowers its variance before clipping. Like noise multiplicity this acts before clipping and so costs
no privacy. Everything is vectorised over rows and drawn from the caller's generator.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENT_CHOICES = ("none", "flip", "crop", "flip+crop")


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Horizontal flip of each row with probability 1/2. x: (N, C, H, W)."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Reflect-pad by `padding` and crop back to (H, W) at a random offset per row (a random
    translation by up to `padding` pixels). x: (N, C, H, W)."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4, mode="reflect")
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=x.device)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=x.device)
    ys = oy[:, None] + torch.arange(h, device=x.device)[None, :]            # (N, H)
    xs = ox[:, None] + torch.arange(w, device=x.device)[None, :]            # (N, W)
    rows = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[rows, ys[:, :, None], xs[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def make_augment(kind: str, crop_padding: int = 2, generator: torch.Generator | None = None):
    """Returns a function (N, C, H, W) -> (N, C, H, W), or None for kind 'none'. It draws from
    ``generator``, or from the one it is called with (``augment(x, generator=g)``)."""
    if kind not in AUGMENT_CHOICES:
        raise ValueError(f"augment must be one of {AUGMENT_CHOICES}, not {kind!r}")
    if kind == "none":
        return None

    bound = generator

    def augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        g = bound if generator is None else generator  # per-sample generators: see edm.edm_draws
        if "flip" in kind:
            x = random_flip(x, g)
        if "crop" in kind:
            x = random_crop(x, crop_padding, g)
        return x

    augment.takes_generator = True
    return augment
