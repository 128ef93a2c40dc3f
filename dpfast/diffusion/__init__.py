"""Diffusion models trained with DP-SGD: DPDM's recipe (Dockhorn et al.) on dpfast's engine.

- unet:      DDPM++ U-Net (`DDPMpp`), written for the engine's per-sample rules
- edm:       EDM preconditioning (`EDMPrecond`) and the loss with noise multiplicity (`edm_loss_rows`)
- samplers:  DDIM and EDM Heun/stochastic samplers with classifier-free guidance
- ema, augment, data, presets, trainer, evaluate, cli: the `dpfast train / sample / evaluate` job
- phases, public, synthetic, finetune: runs of public and private phases, public data (generated
  images among it), trainable selections
- syngen:    DP-SynGen's stage thresholds and the stage-expert sampler

Importing this package imports torch only; the engine is imported when training starts.
"""
from .edm import EDMPrecond, edm_loss_rows, sample_sigmas
from .ema import EMA
from .presets import PRESETS, TrainConfig, get_preset
from .samplers import ddim_sampler, edm_sampler, sample_images
from .unet import DDPMpp, count_parameters

__all__ = ["DDPMpp", "EDMPrecond", "EMA", "PRESETS", "TrainConfig", "count_parameters", "ddim_sampler",
           "edm_loss_rows", "edm_sampler", "get_preset", "sample_images", "sample_sigmas"]
