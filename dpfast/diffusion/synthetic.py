"""Programmatically generated images: public data that depends on nothing but a seed.

Three families, each a function `(n, image_shape, seed) -> uint8 (n, C, H, W)`, at any resolution
and channel count, vectorised over the batch (thousands of 28x28 images per second on one core):

- `dead_leaves`: occluding discs with a power-law radius distribution (the scale-invariant model
  of Lee, Mumford and Huang); DP-SynGen's choice for the cleaning stage (sharp edges and flat
  regions at every scale);
- `fractal_noise`: Gaussian textures with a 1/f^beta power spectrum (beta drawn per image around
  2, the spectrum of natural images): smooth, edge-free structure at every scale;
- `strokes`: a few random quadratic Bezier strokes of random width and grey level on a random
  background: thin, pen-like structure.

`GENERATORS` names them for `dpfast.diffusion.public` (``dead-leaves``, ``fractal``, ``strokes``,
with an optional ``:N`` image count). None of them reads a file: a test runs them with every file
read disabled.
"""
from __future__ import annotations

import torch


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _to_uint8(img: torch.Tensor) -> torch.Tensor:
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def dead_leaves(n: int, image_shape, seed: int = 0, shapes: int = 60, r_min: float = 0.03,
                r_max: float = 0.6, alpha: float = 3.0) -> torch.Tensor:
    """n dead-leaves images, uint8 (n, C, H, W): `shapes` discs per image, dropped one over the other
    (the last one on top), radii (as a fraction of the image side) from the power law
    p(r) ~ r^-alpha on [r_min, r_max] (alpha=3: scale invariance), uniform centres, and a uniform
    grey level per disc (one per channel for colour). A function of the seed only."""
    c, h, w = image_shape
    g = _generator(seed)
    u = torch.rand((n, shapes), generator=g)
    a1 = 1.0 - alpha                                         # inverse CDF of the truncated power law
    radius = (r_min ** a1 + u * (r_max ** a1 - r_min ** a1)) ** (1.0 / a1)
    centre = torch.rand((n, shapes, 2), generator=g)
    colour = torch.rand((n, shapes, c), generator=g)
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    img = torch.rand((n, c, 1, 1), generator=g).expand(n, c, h, w).clone()   # the background
    for s in range(shapes):
        d2 = (ys.view(1, h, 1) - centre[:, s, 0].view(n, 1, 1)) ** 2 \
            + (xs.view(1, 1, w) - centre[:, s, 1].view(n, 1, 1)) ** 2
        inside = (d2 <= radius[:, s].view(n, 1, 1) ** 2).unsqueeze(1)
        img = torch.where(inside, colour[:, s].view(n, c, 1, 1), img)
    return _to_uint8(img)


def fractal_noise(n: int, image_shape, seed: int = 0, beta: tuple[float, float] = (1.5, 3.0),
                  chunk: int = 1024) -> torch.Tensor:
    """n textures with power spectrum ~ 1/|f|^beta (beta uniform in `beta` per image), uint8
    (n, C, H, W): white Gaussian noise shaped in the Fourier domain (amplitude |f|^(-beta/2), the
    constant term removed), each image then stretched to [0, 255] between its 1st and 99th
    percentiles. Channels are independent textures with the image's beta."""
    c, h, w = image_shape
    g = _generator(seed)
    fy = torch.fft.fftfreq(h).view(h, 1)
    fx = torch.fft.rfftfreq(w).view(1, w // 2 + 1)
    radius = (fy ** 2 + fx ** 2).sqrt()
    radius[0, 0] = 1.0                                     # the mean is removed below
    out = torch.empty((n, c, h, w), dtype=torch.uint8)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        b = beta[0] + (beta[1] - beta[0]) * torch.rand((m, 1, 1, 1), generator=g)
        spectrum = torch.fft.rfft2(torch.randn((m, c, h, w), generator=g)) * radius.pow(-b / 2)
        spectrum[..., 0, 0] = 0
        img = torch.fft.irfft2(spectrum, s=(h, w))
        flat = img.flatten(1)
        lo = flat.quantile(0.01, dim=1).view(m, 1, 1, 1)
        hi = flat.quantile(0.99, dim=1).view(m, 1, 1, 1)
        out[start:start + m] = _to_uint8((img - lo) / (hi - lo).clamp_min(1e-8))
    return out


def strokes(n: int, image_shape, seed: int = 0, count: tuple[int, int] = (2, 6),
            width: tuple[float, float] = (0.04, 0.15), points: int = 24, chunk: int = 512) -> torch.Tensor:
    """n images of random strokes, uint8 (n, C, H, W): between count[0] and count[1] quadratic
    Bezier curves per image (three uniform control points each), drawn in order with a width
    (fraction of the image side) uniform in `width`, an antialiased edge and a uniform grey level
    (one per channel), over a uniform background."""
    c, h, w = image_shape
    g = _generator(seed)
    k_max = count[1]
    k = torch.randint(count[0], count[1] + 1, (n,), generator=g)
    ctrl = torch.rand((n, k_max, 3, 2), generator=g)
    half = (width[0] + (width[1] - width[0]) * torch.rand((n, k_max), generator=g)) / 2
    colour = torch.rand((n, k_max, c), generator=g)
    background = torch.rand((n, c, 1, 1), generator=g)
    t = torch.linspace(0, 1, points).view(1, points, 1)
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    pixel = 1.0 / max(h, w)
    out = torch.empty((n, c, h, w), dtype=torch.uint8)
    for start in range(0, n, chunk):      # all randomness is drawn above: chunking changes no image
        sl = slice(start, min(n, start + chunk))
        m = sl.stop - sl.start
        img = background[sl].expand(m, c, h, w).clone()
        for s in range(k_max):
            p0, p1, p2 = ctrl[sl, s, 0:1], ctrl[sl, s, 1:2], ctrl[sl, s, 2:3]      # (m, 1, 2)
            curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2      # (m, points, 2)
            d2 = (ys.view(1, 1, h, 1) - curve[..., 0].view(m, points, 1, 1)) ** 2 \
                + (xs.view(1, 1, 1, w) - curve[..., 1].view(m, points, 1, 1)) ** 2
            dist = d2.amin(dim=1).sqrt()                                        # (m, h, w)
            cover = ((half[sl, s].view(m, 1, 1) - dist) / pixel + 0.5).clamp(0, 1)   # antialiased edge
            cover = (cover * (s < k[sl]).view(m, 1, 1).float()).unsqueeze(1)
            img = img * (1 - cover) + colour[sl, s].view(m, c, 1, 1) * cover
        out[sl] = _to_uint8(img)
    return out


GENERATORS = {
    "dead-leaves": (dead_leaves, "dead-leaves images (power-law discs)"),
    "fractal": (fractal_noise, "1/f^beta fractal-noise textures (beta in [1.5, 3])"),
    "strokes": (strokes, "random Bezier strokes"),
}
DEFAULT_COUNT = 2000
MAX_COUNT = 1_000_000      # generated sets are held in memory (a 28x28 grey million: 0.8 GB)


def parse_generated(source: str) -> tuple[str, int] | None:
    """'dead-leaves' -> ('dead-leaves', 2000); 'fractal:20000' -> ('fractal', 20000); else None."""
    name, _, count = source.partition(":")
    if name not in GENERATORS:
        return None
    if not count:
        return name, DEFAULT_COUNT
    if not count.isdigit() or not 1 <= int(count) <= MAX_COUNT:
        raise ValueError(f"public data {source!r}: the count after ':' must be an integer in [1, {MAX_COUNT:,}]")
    return name, int(count)


def generate(source: str, image_shape, seed: int = 0) -> torch.Tensor:
    name, count = parse_generated(source)
    return GENERATORS[name][0](count, image_shape, seed)


def describe_generated(source: str) -> str:
    name, count = parse_generated(source)
    return f"{count:,} generated {GENERATORS[name][1]}, seed 0"
