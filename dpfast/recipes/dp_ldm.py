"""DP-LDM (Lyu et al., "Differentially private latent diffusion models"): an autoencoder trained on
public data only and then frozen, a diffusion model in its latent space pre-trained on public
latents, and DP-SGD fine-tuning of the attention and conditioning modules only.

The run: the autoencoder (public, `ldm_autoencoder_steps`, before anything else; the report lists it
with the phases), then the phases of dpfast.diffusion.phases: the latent pre-training (public,
`pretrain_steps`) and the private fine-tuning (`trainable`, default `attention`: the attention
blocks and the class embedding; DP-SGD through the engine).

Privacy. The autoencoder is trained on the public data alone, before the private data is opened, and
is frozen from then on; it is a public constant. Encoding maps each private image to its latent by
that fixed function, one record to one record, so a data set and its neighbour (one image added or
removed) map to latent sets that differ in the same one record: DP-SGD on the latents is
(epsilon, delta)-DP with respect to the images, at the accountant's epsilon. Decoding the samples is
post-processing. `tests/diffusion/test_phases.py` checks that the autoencoder does not change when the
private data does, and that the private phase is the only accounted one.

The paper's autoencoder downsamples by 8 at 32x32 (a 4x4x3 latent for MNIST); on the 14x14 CPU scale
this one halves each side (7x7 with `ldm_latent_channels`, 3 by default), and the latent U-Net keeps
7x7 with attention there. Its reconstruction error on the real test set is measured in the tests and
the README.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpfast.diffusion.data import ImageDataset
from dpfast.diffusion.presets import ConfigError
from dpfast.diffusion.trainer import Trainer, atomic_torch_save, prepare_dataset


class Autoencoder(nn.Module):
    """(C, H, W) in [-1, 1] <-> (latent_channels, H/2, W/2), latents scaled to unit variance on the
    public data (`scale`), deterministic (no sampling in the encoder)."""

    def __init__(self, channels: int = 1, latent_channels: int = 3, width: int = 32):
        super().__init__()
        self.channels, self.latent_channels, self.width = channels, latent_channels, width
        self.enc = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, width, 4, stride=2, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, latent_channels, 3, padding=1))
        self.dec = nn.Sequential(nn.Conv2d(latent_channels, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                                 nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, channels, 3, padding=1))
        self.register_buffer("scale", torch.ones(()))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x) / self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dec(z * self.scale))

    def config(self) -> dict:
        return {"channels": self.channels, "latent_channels": self.latent_channels, "width": self.width}


def train_autoencoder(public: ImageDataset, latent_channels: int, steps: int, seed: int, batch_size: int = 128,
                      lr: float = 1e-3, log=print) -> Autoencoder:
    """Reconstruction (MSE) training on public images only, plus a small penalty on the latent's size
    so that its scale stays bounded; then `scale` is set to the latents' standard deviation."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ae = Autoencoder(public.image_shape[0], latent_channels)
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    images = public.images.float() / 127.5 - 1.0
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        x = images[idx]
        z = ae.enc(x)
        loss = F.mse_loss(torch.tanh(ae.dec(z)), x) + 1e-4 * z.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        ae.scale.fill_(float(torch.cat([ae.enc(images[i:i + 1024]) for i in range(0, len(images), 1024)]).std()))
        err = F.mse_loss(ae.decode(ae.encode(images[:1024])), images[:1024]).item()
    log(f"autoencoder: {steps} steps on public data, reconstruction MSE {err:.4f} (public, [-1, 1] scale), "
        f"latent std {float(ae.scale):.3g}")
    return ae.eval().requires_grad_(False)


def load_autoencoder(state: dict, device="cpu") -> Autoencoder:
    ae = Autoencoder(**state["config"])
    ae.load_state_dict(state["weights"])
    return ae.to(device).eval().requires_grad_(False)


class LatentDataset(torch.utils.data.Dataset):
    """Latents (N, c, h, w) float and labels: the private (or public) images through the frozen encoder."""

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor, num_classes: int, name: str,
                 classes_declared: bool = True):
        self.images, self.labels, self.num_classes, self.name = latents, labels, num_classes, name
        self.classes_declared = classes_declared

    @property
    def image_shape(self):
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


@torch.no_grad()
def encode_dataset(ae: Autoencoder, data: ImageDataset) -> LatentDataset:
    x = data.images.float() / 127.5 - 1.0
    z = torch.cat([ae.encode(x[i:i + 2048]) for i in range(0, len(x), 2048)]) if len(x) else \
        torch.zeros((0, ae.latent_channels, x.shape[-2] // 2, x.shape[-1] // 2))
    return LatentDataset(z.contiguous(), data.labels, data.num_classes, f"{data.name} (latents)",
                         getattr(data, "classes_declared", True))


class LDMTrainer(Trainer):
    """The DPDM trainer in the latent space of a public autoencoder (see the module docstring)."""

    def _autoencoder(self, pixel_shape) -> Autoencoder:
        """Trained once on public data, before the private data is opened; kept in out/autoencoder.pt
        (public: no private data went into it) and reloaded on resume."""
        from dpfast.diffusion.public import load_public

        if getattr(self, "ae", None) is not None:
            return self.ae
        cfg = self.cfg
        path = self.out / "autoencoder.pt"
        key = {"public_data": cfg.public_data, "pixel_shape": list(pixel_shape), "steps": cfg.ldm_autoencoder_steps,
               "latent_channels": cfg.ldm_latent_channels, "seed": cfg.seed}
        if path.exists():
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state["key"] != key:
                raise ConfigError(f"{path} was trained with other settings ({state['key']}); use another --out")
            self.ae = load_autoencoder(state)
        else:
            public = load_public(cfg.public_data, pixel_shape, private_dir=cfg.data_dir)
            self.ae = train_autoencoder(public, cfg.ldm_latent_channels, cfg.ldm_autoencoder_steps, cfg.seed,
                                        log=self.log)
            atomic_torch_save({"key": key, "config": self.ae.config(), "weights": self.ae.state_dict()}, path)
        return self.ae

    def _prepare_data(self, dataset):
        cfg = self.cfg
        if cfg.resolution is None:
            raise ConfigError("dp-ldm needs --resolution (the pixel side of the autoencoder)")
        # the shape is public (the config's): the autoencoder exists before the private images are read
        self.pixel_shape = (cfg.channels, cfg.resolution, cfg.resolution)
        if cfg.resolution % 2:
            raise ConfigError(f"dp-ldm halves each side: --resolution must be even, got {cfg.resolution}")
        ae = self._autoencoder(self.pixel_shape)
        pixels = prepare_dataset(cfg, dataset)
        if pixels.image_shape != self.pixel_shape:
            raise ConfigError(f"dp-ldm: the data is {pixels.image_shape}, the autoencoder {self.pixel_shape} "
                              "(set --channels)")
        return encode_dataset(ae, pixels)

    def _load_public(self):
        from dpfast.diffusion.public import load_public

        public = load_public(self.cfg.public_data, self.pixel_shape, private_dir=self.cfg.data_dir)
        return encode_dataset(self.ae, public)

    def _to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.ae.to(x.device).decode(x)

    def _extra_phases(self) -> list[dict]:
        from dpfast.diffusion.public import describe

        return [{"name": "autoencoder", "data": self.cfg.public_data, "steps": self.cfg.ldm_autoencoder_steps,
                 "trainable": "autoencoder", "private": False, "steps_done": self.cfg.ldm_autoencoder_steps,
                 "data_description": describe(self.cfg.public_data), "epsilon": 0.0,
                 "note": "public data only, trained before the private data is read; frozen"}]

    def _model_extra(self) -> dict:
        return {"kind": "latent-diffusion", "pixel_shape": list(self.pixel_shape),
                "autoencoder": {"config": self.ae.config(), "weights": self.ae.state_dict()}}
