"""DP-MEPF (Harder, Jalali Asadabadi, Sutherland and Park, "Pre-trained perceptual features improve
differentially private image generation"): spend the privacy budget once, on noisy per-class mean
embeddings of the private data in the feature space of a network trained on public data, then train
a generator to match them for as long as it likes.

    dpfast train --preset dp-mepf-eps10 --out runs/mepf10

Steps, and where each one's privacy comes from:

1. **The feature network** is trained on public data only (`dpfast.diffusion.public`: by default
   scikit-learn's bundled digits, rescaled to the private images' size). It never sees private data.
   `phi(x)` concatenates the flattened activations of its convolutional layers, as the paper
   does with VGG; a user can pass any `nn.Module` and layer names instead (`FeatureMap`).
2. **The release** is one Gaussian mechanism on a vector of sums (`release_embeddings`). Each record
   (x, y) contributes
       v(x, y) = [ e_y (x) phi(x)/||phi(x)||,  e_y (x) psi(x)/||psi(x)||,  e_y ],  psi = phi^2 elementwise
   (the second block only when second moments are matched). With add/remove-one adjacency two
   neighbouring data sets differ by one record, so their sums differ by one v(x, y), whose norm is
   ||v||^2 = 1 + 1 + 1: the L2 sensitivity is sqrt(3) (sqrt(2) with first moments only). Under
   add/remove the class sizes are private too, which is why the last block releases a noisy count per
   class; the means are then noisy sums divided by noisy counts (post-processing). Gaussian noise of
   standard deviation `sigma * sensitivity` on every coordinate is the Gaussian mechanism with noise
   multiplier sigma: the accountant's phase (sigma, sample_rate=1, steps=1), calibrated for the target
   epsilon with the same API as DP-SGD and composable with DP-SGD phases (`Accountant.release`).
   The noise is dpfast's secure noise (`release_embeddings`): the vector is put on a power-of-two
   grid and an exact discrete Gaussian integer is added (ChaCha20 under a 256-bit key from the OS,
   never stored), so no floating-point sample depends on the data (the attacks of Jin et al. 2022 on
   floating-point Gaussian samplers do not apply; a float64 count plus Box-Muller noise would leak
   whether a small class is empty). The grid adds at most sqrt(dim) * grid to the sensitivity; the
   accountant charges the effective noise multiplier that leaves. The release is accounted with RDP:
   Canonne, Kamath and Steinke (2020) prove the discrete Gaussian's Renyi divergence is at most the
   continuous Gaussian's, so the RDP epsilon is proven for it; the PRV value (tighter, the continuous
   curve) is reported beside it as `epsilon_prv`.
   The number of classes C is public: a declared class count (Fashion-MNIST's 10, an image folder's
   sub-folders, or --num-classes), never labels.max() + 1 of the private labels (refused), so the
   released shapes do not depend on the data. The feature dimension comes from a dummy input. A
   record whose features are not finite contributes a zero vector. The one pass over the private
   data has no progress bar (its length would show N); timing is not covered.
3. **The generator** is trained on the released vector only: its loss compares the generator's own
   feature means with the noisy targets. Nothing after the release reads the private data (the
   trainer drops its reference to the data set before the generator's first step; a test checks it),
   so the generator, its samples and everything downstream are post-processing.

The paper divides by the true class counts (its adjacency replaces a record, so the counts are
public); dpfast's add/remove adjacency does not allow that, hence the noisy counts.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpfast.diffusion import public as public_data
from dpfast.diffusion.data import ImageDataset
from dpfast.diffusion.presets import TrainConfig

MOMENTS = ("mean", "mean+second")


# ----------------------------------------------------------------------------- the feature network
class PublicCNN(nn.Module):
    """A small VGG-like classifier trained on public data; its five ReLU outputs are the features."""

    FEATURE_LAYERS = ("b0", "b1", "b2", "b3", "b4")

    def __init__(self, in_channels: int, num_classes: int, width: int = 16):
        super().__init__()
        w = width
        self.b0 = nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.ReLU())
        self.b2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU())
        self.b4 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, max(1, num_classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.FEATURE_LAYERS:
            x = getattr(self, name)(x)
        return self.head(x)


class FeatureMap(nn.Module):
    """phi(x): the flattened outputs of `layers` (module names of `net`) concatenated, (B, D).
    `net` is frozen and kept in eval mode; gradients still flow to the input (the generator's)."""

    def __init__(self, net: nn.Module, layers):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.layers = tuple(layers)
        modules = dict(net.named_modules())
        missing = [n for n in self.layers if n not in modules]
        if missing:
            raise ValueError(f"feature layers {missing} are not modules of the feature network")
        self._outs: list = []
        for n in self.layers:
            modules[n].register_forward_hook(lambda mod, inp, out: self._outs.append(out))

    def train(self, mode: bool = True):  # the feature network stays in eval mode
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._outs = []
        self.net(x)
        outs, self._outs = self._outs, []
        return torch.cat([o.flatten(1) for o in outs], dim=1)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (a zero row stays zero: its norm, 0, is within the bound too)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def embed(features: torch.Tensor, moments: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(phi / ||phi||, psi / ||psi||) of a batch of features, psi = phi^2; each row has norm <= 1."""
    first = _unit(features)
    second = _unit(features * features) if moments == "mean+second" else None
    return first, second


def train_public_feature_net(public: ImageDataset, steps: int, seed: int = 0, width: int = 16,
                             batch_size: int = 128, lr: float = 1e-3, progress: bool = False) -> PublicCNN:
    """Supervised training on the public images (random 2-pixel shifts as augmentation)."""
    from tqdm import tqdm

    if public.num_classes < 2:
        raise ValueError(f"public data {public.name!r} has no labels: the feature network is a classifier")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = PublicCNN(public.image_shape[0], public.num_classes, width)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    x_all = public.images.float() / 127.5 - 1.0
    for _ in tqdm(range(steps), desc="feature network (public data)", unit="step", disable=not progress,
                  dynamic_ncols=True, leave=False):
        idx = torch.randint(0, len(public), (batch_size,), generator=g)
        x = x_all[idx]
        dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        loss = F.cross_entropy(net(x), public.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


# ----------------------------------------------------------------------------- the release
@dataclass
class Release:
    """The released (noisy) vector, split into its parts, and how it was made."""
    sums: torch.Tensor            # (C, D) noisy per-class sums of phi/||phi||
    second_sums: torch.Tensor | None
    counts: torch.Tensor          # (C,) noisy per-class counts
    noise_multiplier: float       # nominal: noise std / sensitivity
    sensitivity: float
    moments: str
    effective_noise_multiplier: float = 0.0   # what the accountant charges (the grid's, below nominal)
    config: dict | None = None    # the run's configuration when it was released

    def targets(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-class means: noisy sums / noisy counts (counts below 1 are read as 1)."""
        n = self.counts.clamp_min(1.0)[:, None].to(self.sums.dtype)
        return self.sums / n, None if self.second_sums is None else self.second_sums / n

    def state_dict(self) -> dict:
        return {"sums": self.sums, "second_sums": self.second_sums, "counts": self.counts,
                "noise_multiplier": self.noise_multiplier, "sensitivity": self.sensitivity,
                "moments": self.moments, "effective_noise_multiplier": self.effective_noise_multiplier,
                "config": self.config}

    @classmethod
    def from_state_dict(cls, s: dict) -> "Release":
        return cls(s["sums"], s["second_sums"], s["counts"], s["noise_multiplier"], s["sensitivity"], s["moments"],
                   s.get("effective_noise_multiplier", 0.0), s.get("config"))


def sensitivity(moments: str) -> float:
    return math.sqrt(3.0 if moments == "mean+second" else 2.0)


def release_dim(num_classes: int, feature_dim: int, moments: str) -> int:
    """Coordinates of the released vector: C*D sums (twice with second moments) and C counts."""
    return num_classes * feature_dim * (2 if moments == "mean+second" else 1) + num_classes


def feature_dim(feature_map: "FeatureMap", image_shape, device="cpu") -> int:
    """D, from a public dummy input: the released shape never depends on the private data."""
    with torch.no_grad():
        return int(feature_map(torch.zeros(1, *image_shape, device=device)).shape[1])


@torch.no_grad()
def exact_sums(feature_map: FeatureMap, data: ImageDataset, num_classes: int, moments: str,
               batch_size: int = 500, device="cpu"):
    """The noiseless vector sum_i v(x_i, y_i), in float64: ((C, D), (C, D) or None, (C,)).

    A record whose features are not all finite contributes a zero vector (norm 0, within the
    bound), so a diverged feature network cannot reveal which classes hold records. The class count
    C is the run's public one (labels outside [0, C) are refused before this, by prepare_dataset)."""
    if num_classes < 1:
        raise ValueError("num_classes must be >= 1")
    d = feature_dim(feature_map, data.image_shape, device)
    sums = torch.zeros(num_classes, d, dtype=torch.float64)
    second = torch.zeros_like(sums) if moments == "mean+second" else None
    counts = torch.zeros(num_classes, dtype=torch.float64)
    labels = data.labels if num_classes > 1 else torch.zeros(len(data), dtype=torch.long)
    for i in range(0, len(data), batch_size):  # no progress bar: its length would show N
        x = (data.images[i:i + batch_size].float() / 127.5 - 1.0).to(device)
        y = labels[i:i + batch_size]
        feats = feature_map(x).double().cpu()
        ok = torch.isfinite(feats).all(dim=1, keepdim=True)
        first, sq = embed(torch.where(ok, feats, torch.zeros_like(feats)), moments)
        sums.index_add_(0, y, first)
        if sq is not None:
            second.index_add_(0, y, sq)
        counts += torch.bincount(y, minlength=num_classes).double()
    return sums, second, counts


def integer_noise(n: int, key: bytes, scale_s: int) -> torch.Tensor:
    """n draws of the exact discrete Gaussian N_Z(0, scale_s^2) from ChaCha20 under `key`
    (dpfast.random_secure; the compiled dpfast._C sampler when built, the reference otherwise)."""
    from dpfast import random_secure as rs
    from dpfast._ext import ext

    if ext is not None and hasattr(ext, "discrete_gaussian_cpu"):
        out = torch.empty(n, dtype=torch.int64)
        ext.discrete_gaussian_cpu(out.data_ptr(), n, 0, key, int(scale_s), 0)
        return out
    return torch.from_numpy(rs.discrete_gaussian(n, key=key, step=0, scale_s=int(scale_s)))


def noise_multiplier_for(target: float, dim: int, moments: str) -> float:
    """The nominal noise multiplier whose effective one (after the grid, `secure_noise_multiplier`)
    is at least `target`."""
    from dpfast.random_secure import nominal_noise_multiplier

    return nominal_noise_multiplier(target, dim, max_grad_norm=sensitivity(moments))


def release_embeddings(feature_map: FeatureMap, data: ImageDataset, num_classes: int, moments: str,
                       noise_multiplier: float, device="cpu", key: bytes | None = None) -> Release:
    """The release (module docstring), with dpfast's secure noise: the vector V is put on the grid
    g = 2^grid_exp (a = rint(V / g), exact in float64), an integer k ~ N_Z(0, S^2) is drawn exactly
    from ChaCha20 under a fresh 256-bit key from the OS (`key` is for tests only), and the release is
    (a + k) g. No floating-point sample ever depends on the data, so the attacks on floating-point
    Gaussian samplers (Jin et al. 2022) do not apply; the rounding adds at most sqrt(dim) g to the
    sensitivity, which the effective noise multiplier S g / (sensitivity + sqrt(dim) g) accounts."""
    from dpfast import random_secure as rs

    if moments not in MOMENTS:
        raise ValueError(f"moments must be one of {MOMENTS}, got {moments!r}")
    sums, second, counts = exact_sums(feature_map, data, num_classes, moments, device=device)
    flat = torch.cat([sums.flatten()] + ([second.flatten()] if second is not None else []) + [counts])
    delta_l2 = sensitivity(moments)
    scale_s, grid_exp = rs.secure_grid(float(noise_multiplier) * delta_l2)
    a = torch.round(torch.ldexp(flat, torch.tensor(-grid_exp, dtype=torch.float64))).to(torch.int64)
    k = integer_noise(flat.numel(), rs.new_key() if key is None else rs.check_key(key), scale_s)
    noisy = torch.ldexp((a + k).to(torch.float64), torch.tensor(grid_exp, dtype=torch.float64))
    c, d = sums.shape
    out_second = noisy[c * d:2 * c * d].view(c, d) if second is not None else None
    effective = rs.secure_noise_multiplier(noise_multiplier, dim=flat.numel(), max_grad_norm=delta_l2)
    return Release(noisy[:c * d].view(c, d), out_second, noisy[-c:], float(noise_multiplier), delta_l2, moments,
                   effective)


# ----------------------------------------------------------------------------- the generator
class _UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, up: bool):
        super().__init__()
        self.up = up
        self.n1, self.c1 = nn.GroupNorm(min(8, cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.n2, self.c2 = nn.GroupNorm(min(8, cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        h = self.c1(F.silu(self.n1(x)))
        h = self.c2(F.silu(self.n2(h)))
        return h + self.skip(x)


def _start_size(size: int) -> tuple[int, int]:
    """(s0, u): size = s0 * 2^u with s0 >= 4 and u as large as possible."""
    u = 0
    while size % 2 ** (u + 1) == 0 and size // 2 ** (u + 1) >= 4:
        u += 1
    return size // 2 ** u, u


class Generator(nn.Module):
    """A small class-conditional ResNet generator: (z, label) -> image in [-1, 1]."""

    def __init__(self, image_shape, num_classes: int, z_dim: int = 64, width: int = 32):
        super().__init__()
        c, h, w = image_shape
        if h != w:
            raise ValueError(f"the generator makes square images, got {h}x{w}")
        self.image_shape, self.num_classes, self.z_dim = tuple(image_shape), num_classes, z_dim
        self.s0, ups = _start_size(h)
        ch = 4 * width
        self.embed = nn.Embedding(max(1, num_classes), z_dim)
        self.fc = nn.Linear(2 * z_dim, ch * self.s0 * self.s0)
        blocks, cin = [], ch
        for i in range(max(1, ups)):
            cout = max(width, cin // 2)
            blocks.append(_UpBlock(cin, cout, up=i < ups))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Sequential(nn.GroupNorm(min(8, cin), cin), nn.SiLU(), nn.Conv2d(cin, c, 3, padding=1))
        self._ch = ch

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            labels = torch.zeros(len(z), dtype=torch.long, device=z.device)
        h = self.fc(torch.cat([z, self.embed(labels)], dim=1)).view(len(z), self._ch, self.s0, self.s0)
        return torch.tanh(self.out(self.blocks(h)))

    @torch.no_grad()
    def sample(self, num: int, labels: torch.Tensor | None = None, seed: int = 0, batch_size: int = 500,
               device="cpu") -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        out = []
        was = self.training
        self.eval()
        for i in range(0, num, batch_size):
            m = min(batch_size, num - i)
            z = torch.randn(m, self.z_dim, generator=g).to(device)
            y = None if labels is None else labels[i:i + m].to(device)
            out.append(self(z, y).cpu())
        self.train(was)
        return torch.cat(out) if out else torch.empty((0, *self.image_shape))


def matching_loss(gen_features: torch.Tensor, labels: torch.Tensor, targets, moments: str,
                  num_classes: int) -> torch.Tensor:
    """Sum over the classes in the batch of ||mean embedding of the generated images - target||^2
    (the MMD with the perceptual-feature kernel), for the first and, optionally, second moment."""
    first, second = embed(gen_features, moments)
    onehot = F.one_hot(labels, num_classes).to(first.dtype)          # (B, C)
    n = onehot.sum(0)
    present = n > 0
    means = (onehot.T @ first)[present] / n[present, None]
    loss = ((means - targets[0][present]) ** 2).sum(1).mean()
    if second is not None:
        means2 = (onehot.T @ second)[present] / n[present, None]
        loss = loss + ((means2 - targets[1][present]) ** 2).sum(1).mean()
    return loss


# ----------------------------------------------------------------------------- the recipe's trainer
class MEPFTrainer:
    """`dpfast train` for cfg.recipe == "dp-mepf". Output directory:
        feature_net.pt       the public-data feature network
        release_started.json written just before the release; with no embeddings.pt beside it a
                             release happened (privacy spent) but its result was lost: refused
        embeddings.pt        the released noisy sums and counts (differentially private: shareable)
        checkpoint.pt        generator, EMA, optimizer, step (no secrets: the noise key is never kept)
        model.pt             the EMA generator for `dpfast sample`
        privacy_report.json  samples.png  config.json
    """

    def __init__(self, cfg: TrainConfig, out_dir, dataset: ImageDataset | None = None, progress: bool = True,
                 log=print, feature_map: FeatureMap | None = None):
        """feature_map: your own phi, e.g. FeatureMap(torchvision_vgg_with_your_weights, ["features.3", ...]).
        It must have been trained on public data only (dpfast cannot check that); pass the same one
        again when a run resumes. None: PublicCNN trained on cfg.public_data."""
        self.user_feature_map = feature_map
        import os

        from dpfast.diffusion.presets import ConfigError
        from dpfast.diffusion.trainer import OutLock, _check_resumable, prepare_dataset, resolve_device

        self.started = time.monotonic()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("dp-mepf runs in one process (its one pass over the data takes seconds); "
                              "run it without torchrun")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = OutLock(self.out)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.resume_state = None
        if self.ckpt_path.exists():
            self.resume_state = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
            cfg = _check_resumable(TrainConfig.from_dict(self.resume_state["config"]), cfg)
        if cfg.mepf_moments not in MOMENTS:
            raise ConfigError(f"mepf_moments must be one of {MOMENTS}, got {cfg.mepf_moments!r}")
        if cfg.steps is None:
            raise ConfigError("dp-mepf needs --steps (generator steps; its privacy does not depend on them)")
        if cfg.private and cfg.noise_multiplier is None and cfg.target_epsilon is None:
            raise ConfigError("a private run needs target_epsilon or noise_multiplier")
        self.cfg, self.log, self.progress = cfg, log, progress
        # before a cached feature_net.pt is reused: its public data against this run's private data
        public_data.check_disjoint(public_data.source_paths(cfg.public_data), cfg.data_dir)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        self.dataset = prepare_dataset(cfg, dataset)
        self.image_shape = self.dataset.image_shape
        self.num_classes = self.dataset.num_classes if cfg.class_conditional else 0
        self.total_steps = int(cfg.steps)
        self.step, self.elapsed = 0, 0.0

    # -- the release (the only use of the private data)
    def _feature_map(self) -> FeatureMap:
        from dpfast.diffusion.trainer import atomic_torch_save

        if self.user_feature_map is not None:
            fmap = self.user_feature_map
            if not all(torch.isfinite(p).all() for p in fmap.parameters()):
                raise ValueError("the feature map has non-finite weights")
            return fmap.to(self.device)
        path = self.out / "feature_net.pt"
        c = self.image_shape[0]
        if path.exists():
            state = torch.load(path, map_location="cpu", weights_only=False)
            if (state.get("public_data"), state.get("image_shape")) != (self.cfg.public_data, list(self.image_shape)):
                raise ValueError(f"{path} was trained on other public data or another image size: use a new --out")
            net = PublicCNN(c, state["num_classes"], state["width"])
            net.load_state_dict(state["model"])
        else:
            public = public_data.load_public(self.cfg.public_data, self.image_shape, private_dir=self.cfg.data_dir)
            self.log(f"feature network: {self.cfg.mepf_feature_steps} steps on public data "
                     f"({public_data.describe(self.cfg.public_data)})")
            net = train_public_feature_net(public, self.cfg.mepf_feature_steps, seed=self.cfg.seed,
                                           progress=self.progress)
            atomic_torch_save({"model": net.state_dict(), "num_classes": public.num_classes, "width": 16,
                               "public_data": self.cfg.public_data, "image_shape": list(self.image_shape)}, path)
        if not all(torch.isfinite(p).all() for p in net.parameters()):
            raise ValueError("the feature network (public data only) has non-finite weights: retrain it with "
                             "fewer --mepf-feature-steps or another --public-data")
        return FeatureMap(net, PublicCNN.FEATURE_LAYERS).to(self.device)

    def _noise_multiplier(self, dim: int) -> float:
        """Nominal sigma: the configured one, or calibrated (RDP, proven for the discrete Gaussian)
        so that the effective sigma the accountant charges meets the target epsilon."""
        cfg = self.cfg
        if cfg.noise_multiplier is not None:
            return float(cfg.noise_multiplier)
        from dpfast.accounting import calibrate_noise_multiplier

        target = calibrate_noise_multiplier(cfg.target_epsilon, cfg.delta, 1.0, steps=1, accountant="rdp")
        return noise_multiplier_for(target, dim, cfg.mepf_moments)

    def _release(self, fmap: FeatureMap) -> Release:
        from dpfast.diffusion.trainer import _check_resumable, atomic_torch_save, atomic_write_json, public_config

        cfg = self.cfg
        path, marker = self.out / "embeddings.pt", self.out / "release_started.json"
        saved = json.loads(marker.read_text()).get("config") if marker.exists() else None
        if saved is not None:  # the release's settings can never change afterwards (only run control)
            # the marker withholds a pinned noise seed (public_config); dp-mepf's noise never uses it (a
            # fresh OS key), so the run's own is kept
            saved = {**saved, "noise_seed": cfg.noise_seed}
            self.cfg = cfg = _check_resumable(TrainConfig.from_dict(saved), cfg)
        if path.exists():
            return Release.from_state_dict(torch.load(path, map_location="cpu", weights_only=False))
        if marker.exists():
            raise RuntimeError(f"{marker} says a release was made but its result was never saved (the run "
                               "died during it): that privacy is spent. Start again in a new --out, and count "
                               "both releases.")
        classes = max(1, self.num_classes)
        dim = release_dim(classes, feature_dim(fmap, self.image_shape, self.device), cfg.mepf_moments)
        sigma = self._noise_multiplier(dim) if cfg.private else 0.0
        atomic_write_json({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "config": public_config(cfg),
                           "feature_map": "user" if self.user_feature_map is not None else "PublicCNN"}, marker)
        if cfg.private:
            release = release_embeddings(fmap, self.dataset, classes, cfg.mepf_moments, sigma, device=self.device)
        else:  # the non-private baseline: the exact means
            sums, second, counts = exact_sums(fmap, self.dataset, classes, cfg.mepf_moments, device=self.device)
            release = Release(sums, second, counts, 0.0, sensitivity(cfg.mepf_moments), cfg.mepf_moments, 0.0)
        release.config = public_config(cfg)
        atomic_torch_save(release.state_dict(), path)
        return release

    # -- reports
    def privacy_report(self, release: Release) -> dict:
        """Built from the release itself (its stored settings), never from the current config."""
        common = {"recipe": "dp-mepf", "steps": self.step, "planned_steps": self.total_steps,
                  "complete": self.step >= self.total_steps, "sample_rate": 1.0,
                  "public_data": public_data.describe(self.cfg.public_data), "num_classes": release.counts.numel(),
                  "noisy_count_total": float(release.counts.sum()), "moments": release.moments}
        if release.noise_multiplier == 0:
            return {"private": False, "epsilon": None, "note": "exact feature means: NOT private", **common}
        from dpfast.accounting import epsilon_report

        delta = (release.config or self.cfg.to_dict())["delta"]
        sigma_eff = release.effective_noise_multiplier
        rep = epsilon_report([(sigma_eff, 1.0, 1)], delta, "rdp").to_dict()
        prv = epsilon_report([(sigma_eff, 1.0, 1)], delta, "prv").epsilon
        return {"private": True, "epsilon": rep["epsilon"], "delta": delta, "end_to_end": True,
                "guarantee_lost": None, "releases_charged": 1,
                "adjacency": "add/remove-one (one release of the whole data set)",
                "mechanism": "discrete Gaussian (exact, ChaCha20), one-shot: per-class sums of unit-normalised "
                             "features" + (" and of their squares" if release.moments == "mean+second" else "")
                             + ", and per-class counts",
                "noise_multiplier": release.noise_multiplier, "effective_noise_multiplier": sigma_eff,
                "sensitivity": release.sensitivity, "noise_std": release.noise_multiplier * release.sensitivity,
                "accountant": "rdp (proven for the discrete Gaussian)", "epsilon_prv": prv,
                "history": [[sigma_eff, 1.0, 1]],
                "target_epsilon": (release.config or {}).get("target_epsilon"),
                "feature_network": ("a user-supplied feature map (its training data is the user's responsibility)"
                                    if self.user_feature_map is not None else
                                    "PublicCNN trained on the public data only"), **common}

    # -- training
    def _save_checkpoint(self, gen, ema, opt, rng) -> None:
        from dpfast.diffusion.trainer import atomic_torch_save

        atomic_torch_save({"config": self.cfg.to_dict(), "step": self.step, "elapsed": self.elapsed,
                           "image_shape": list(self.image_shape), "num_classes": self.num_classes,
                           "kind": "dp-mepf-generator", "generator": gen.state_dict(), "ema": ema.state_dict(),
                           "optimizer": opt.state_dict(), "rng": rng.get_state()}, self.ckpt_path)

    def train(self) -> dict:
        try:
            return self._train()
        finally:
            self.lock.release()

    def _train(self) -> dict:
        from dpfast.diffusion.ema import EMA
        from dpfast.diffusion.trainer import (_StopOnSignal, atomic_torch_save, atomic_write_json, grid_labels,
                                              grid_row_labels, public_config, save_grid)

        cfg = self.cfg
        atomic_write_json(public_config(cfg), self.out / "config.json")
        setup = time.perf_counter()
        fmap = self._feature_map()
        release = self._release(fmap)
        setup = time.perf_counter() - setup
        self.dataset = None   # nothing below reads the private data: the generator sees `release` only
        targets = tuple(None if t is None else t.to(self.device, torch.float32) for t in release.targets())
        classes = max(1, self.num_classes)
        torch.manual_seed(cfg.seed)
        gen = Generator(self.image_shape, self.num_classes, width=cfg.nf).to(self.device)
        ema = EMA(gen, cfg.ema_decay)
        opt = torch.optim.Adam(gen.parameters(), lr=cfg.lr)
        rng = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        if self.resume_state is not None:
            s = self.resume_state
            gen.load_state_dict(s["generator"])
            ema.load_state_dict(s["ema"])
            opt.load_state_dict(s["optimizer"])
            rng.set_state(s["rng"])
            self.step, self.elapsed = s["step"], s["elapsed"]
            self.log(f"resuming the generator from step {self.step} of {self.total_steps}")
        eps = self.privacy_report(release).get("epsilon")
        self.log(f"DP-MEPF: released {'noisy ' if cfg.private else 'EXACT (not private) '}per-class embeddings "
                 f"({release.sums.shape[1]} features x {classes} classes, {release.moments}); generator "
                 f"{sum(p.numel() for p in gen.parameters()):,} parameters, {self.total_steps} steps"
                 + (f"; epsilon {eps:.4g} at delta={cfg.delta:g} (sigma={release.noise_multiplier:.4g})"
                    if eps is not None else ""))
        stop_at = self.total_steps if cfg.max_steps is None else min(self.total_steps, cfg.max_steps)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=stop_at, initial=self.step, unit="step", dynamic_ncols=True, mininterval=1.0,
                       file=sys.stderr, desc="generator")
        reason, last_ckpt, stop = "done", time.monotonic(), _StopOnSignal()
        first = self.step
        labels = torch.arange(cfg.batch_size, device=self.device) % classes
        try:
            while self.step < stop_at:
                t0 = time.monotonic()
                if cfg.time_budget is not None and t0 - self.started > cfg.time_budget:
                    reason = "time budget"
                    break
                if stop.received:
                    reason = stop.received
                    break
                z = torch.randn(cfg.batch_size, gen.z_dim, generator=rng, device=self.device)
                loss = matching_loss(fmap(gen(z, labels if self.num_classes else None)), labels, targets,
                                     release.moments, classes)
                opt.zero_grad()
                loss.backward()
                opt.step()
                ema.update(gen)
                self.step += 1
                self.elapsed += time.monotonic() - t0
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss):.3g}", refresh=False)
                if self.step % cfg.checkpoint_every == 0 or time.monotonic() - last_ckpt >= cfg.checkpoint_seconds:
                    self._save_checkpoint(gen, ema, opt, rng)
                    last_ckpt = time.monotonic()
        finally:
            stop.restore()
            if bar is not None:
                bar.close()
        self._save_checkpoint(gen, ema, opt, rng)
        sample_gen = ema.copy_to(Generator(self.image_shape, self.num_classes, width=cfg.nf).to(self.device))
        atomic_torch_save({"kind": "dp-mepf-generator", "config": public_config(cfg), "step": self.step,
                           "image_shape": list(self.image_shape), "num_classes": self.num_classes,
                           "ema": sample_gen.state_dict()}, self.out / "model.pt")
        n = cfg.grid_size * cfg.grid_size
        save_grid(sample_gen.sample(n, grid_labels(cfg, self.num_classes), seed=cfg.seed, device=self.device),
                  self.out / "samples.png", nrow=cfg.grid_size, row_labels=grid_row_labels(cfg, self.num_classes))
        report = self.privacy_report(release)
        atomic_write_json(report, self.out / "privacy_report.json")
        done = self.step >= self.total_steps
        self.log(f"trained {self.step - first} generator steps in {self.elapsed:.1f} s (all invocations)")
        eps_line = (f"epsilon spent: {report['epsilon']:.4g} at delta={report['delta']:g} (one discrete Gaussian "
                    f"release, RDP accountant, sigma={release.noise_multiplier:.4g}, sensitivity "
                    f"{release.sensitivity:.4g})" if report["private"] else "no privacy: exact feature means (--no-private)")
        status = "finished" if done else (f"stopped ({reason}) at step {self.step}/{self.total_steps}; run the "
                                          "same command again to resume")
        self.log(f"{status}. {eps_line}")
        self.log(f"samples: {self.out / 'samples.png'}  model: {self.out / 'model.pt'}  privacy report: "
                 f"{self.out / 'privacy_report.json'}")
        return {"status": status, "reason": reason, "steps": self.step, "report": report,
                "train_seconds": self.elapsed, "release_seconds": setup}


def load_generator(state: dict, device="cpu") -> Generator:
    """The EMA generator from a model.pt or checkpoint.pt state of a dp-mepf run."""
    cfg = TrainConfig.from_dict(state["config"])
    gen = Generator(tuple(state["image_shape"]), state["num_classes"], width=cfg.nf)
    weights = state["ema"]["shadow"] if "shadow" in state["ema"] else state["ema"]
    gen.load_state_dict(weights)
    return gen.to(device).eval()


