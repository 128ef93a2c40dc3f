"""Black-box one-run audit of a full diffusion training run with input canaries (Steinke, Nasr and
Jagielski, NeurIPS 2023; the bound and report are :mod:`dpfast.audit`'s).

m canary images, out-of-distribution stripe patterns made by a program from a public seed
(:func:`make_canaries`: gratings, one spatial frequency each), are each put in the *private* training set
independently with probability 1/2, and the run is the real one: a
:class:`~dpfast.diffusion.presets.TrainConfig` (a preset) through the real trainer, engine, Poisson
sampler, clipping, noise and accountant, writing the same files as ``dpfast train``. The auditor then
sees only what the run releases, the model (``model.pt``, the EMA weights), and scores each canary by
that model's denoising loss on it, averaged over fixed public (sigma, noise) draws that are the same for
every canary (:func:`canary_losses`): canaries the model trained on are denoised better, so the lowest
losses are guessed "in" and the highest "out", and the number of correct guesses gives the lower bound
(several guess-set sizes, beta split between them by a union bound, as in :func:`dpfast.audit.audit_engine`).

Why the bound is honest (what the one-run theorem needs, and how it is met here):
- the canary coins S_i are drawn independently of everything the mechanism uses: from ``seed`` (or the
  OS) through their own generator, while the engine's seed (Poisson sampling and DP noise) is the OS's
  (or the config's noise_seed), or, when ``seed`` pins the run for a test, a different number derived
  from it (``2 seed + 1``, audit_engine's convention);
- the canary patterns come from a fixed public seed and the scoring draws from another, both fixed
  before the coins are drawn, so neither depends on S;
- every canary has the same class label, :data:`CANARY_LABEL` (0), fixed in advance, so a label says
  nothing about which canaries are in (an unconditional model ignores it); label dropout treats the
  canaries like any other record;
- the claimed epsilon is the accountant's epsilon of the run as trained, on the private set *with* the
  canaries that are in (N + sum(S) records), at q = batch_size / (N + m), sigma and steps fixed from
  N + m before the coins are drawn: one mechanism, the same whatever the coins, DP in each of them.
  The guesses use the released model only;
Canaries are appended after the config's subset and resolution are applied (--subset N keeps N real
images), at the run's image shape. Recipes whose private data set is the base trainer's own
(dpdm, dp-diffusion, dp-lora) are supported; the others (a latent space, a teacher trained on its own
copy of the data, a generator that is not a denoiser, stage experts) are refused with a one-line error.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

from .audit import GUESS_FRACTIONS, AuditReport, best_bound, epsilon_lower_bound

__all__ = ["audit_training", "make_canaries", "canary_losses", "CANARY_LABEL", "AUDITABLE_RECIPES"]

CANARY_LABEL = 0           # the class of every canary (public, fixed: independent of the coins)
PATTERN_SEED = 20231       # public: the canary images
SCORE_SEED = 20232         # public: the (sigma, noise) draws that score them
AUDITABLE_RECIPES = ("dpdm", "dp-diffusion", "dp-lora")


def canary_frequencies(image_shape) -> list[tuple[int, int]]:
    """The spatial frequencies (u, v) of an H x W image up to the sign (u, v) ~ (-u, -v) (mod H, W), DC
    left out: one canary each, so at most len(...) canaries (99 at 14 x 14, 393 at 28 x 28)."""
    _, h, w = image_shape
    seen = []
    for u in range(h):
        for v in range(w):
            key = min((u, v), ((-u) % h, (-v) % w))
            if key != (0, 0) and key not in seen:
                seen.append(key)
    return seen


def make_canaries(m: int, image_shape, *, seed: int = PATTERN_SEED) -> torch.Tensor:
    """m stripe patterns (plane-wave gratings), (m, C, H, W) uint8 over the full range (amplitude 1 in
    [-1, 1] once scaled like the data): canary j is cos(2 pi (u_j y / H + v_j x / W) + phi_j) on every
    channel, each at its own spatial frequency (u_j, v_j) (a public pseudo-random pick from
    :func:`canary_frequencies`) with a public random phase.

    Why gratings: two of them at different frequencies are orthogonal, also after any shift, so what a
    convolutional denoiser learns from the canaries that are in (to pass their frequencies through
    its filters rather than treat them as noise) does not help it denoise those that are out, and
    natural images put little power at most of these frequencies. Random binary patterns were tried
    first and gave a much weaker signal: a small U-Net learns the generic "binary pixels" prior, which
    denoises in and out canaries alike, long before it memorises any one of them."""
    c, h, w = image_shape
    freqs = canary_frequencies(image_shape)
    if m > len(freqs):
        raise ValueError(f"{h}x{w} images have {len(freqs)} distinct spatial frequencies, so at most "
                         f"{len(freqs)} canaries; got {m}")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(freqs), generator=g)[:m].tolist()
    phases = (torch.rand(m, generator=g, dtype=torch.float64) * 2 * math.pi).tolist()
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    out = torch.empty(m, h, w, dtype=torch.float64)
    for j, (i, phi) in enumerate(zip(pick, phases)):
        u, v = freqs[i]
        if ((-u) % h, (-v) % w) == (u, v):  # a Nyquist frequency: cos(pi y + phi) needs phi = 0 for full amplitude
            phi = 0.0
        img = torch.cos(2 * math.pi * (u * yy / h + v * xx / w) + phi)
        out[j] = img / img.abs().max()
    return ((out[:, None].expand(m, c, h, w) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def canary_losses(denoiser, images: torch.Tensor, label: int | None, *, draws: int = 32, p_mean: float = -1.2,
                  p_std: float = 1.2, sigma_range: tuple[float, float] | None = None, seed: int = SCORE_SEED,
                  batch_size: int = 256) -> torch.Tensor:
    """The EDM denoising loss of each image, averaged over ``draws`` fixed (sigma, noise) pairs: (m,).

    images: (m, C, H, W) in [-1, 1]. Draw j is the same sigma_j (ln sigma ~ N(p_mean, p_std^2), the
    training distribution) and the same noise image n_j for every image, so two images' scores differ
    only through the model, never through luckier noise. label: the class to condition on, an int or
    one per image ((m,) long); None: unconditional."""
    from .diffusion.edm import edm_loss_weight, sample_sigmas

    dev = next(denoiser.parameters()).device
    g = torch.Generator().manual_seed(seed)
    sigma = sample_sigmas(draws, p_mean, p_std, generator=g, sigma_range=sigma_range)
    noise = torch.randn((draws,) + tuple(images.shape[1:]), generator=g)
    weight = edm_loss_weight(sigma, denoiser.sigma_data)
    out = torch.zeros(len(images))
    per = max(1, batch_size // draws)
    for i in range(0, len(images), per):
        x = images[i:i + per]
        n = len(x)
        xr = x.repeat_interleave(draws, dim=0)                               # (n * draws, C, H, W)
        s = sigma.repeat(n)
        noisy = xr + s.reshape(-1, 1, 1, 1) * noise.repeat(n, 1, 1, 1)
        if label is None:
            y = None
        elif isinstance(label, torch.Tensor):
            y = label[i:i + per].repeat_interleave(draws).to(dev)
        else:
            y = torch.full((len(xr),), int(label), dtype=torch.long, device=dev)
        d = denoiser(noisy.to(dev), s.to(dev), y).cpu()
        loss = weight.repeat(n) * ((d - xr) ** 2).flatten(1).mean(dim=1)
        out[i:i + n] = loss.reshape(n, draws).mean(dim=1)
    return out


def check_auditable(cfg) -> None:
    """One-line errors (ConfigError) for a config this audit cannot run, before anything is trained."""
    from .diffusion.presets import ConfigError

    cfg.validate()
    if cfg.recipe not in AUDITABLE_RECIPES:
        raise ConfigError(f"the input-canary audit runs recipes {', '.join(AUDITABLE_RECIPES)} (their private data "
                          f"set is the trainer's own); this config's recipe is {cfg.recipe}")
    if not cfg.private:
        raise ConfigError("the config trains without DP (private false): there is no claim to audit")
    if getattr(cfg, "max_steps", None) is not None or getattr(cfg, "time_budget", None):
        raise ConfigError("the audit needs the whole run: drop max_steps / time_budget (set steps instead)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("the input-canary audit runs in one process: every rank would draw its own coins")


def audit_training(config, *, canaries: int | None = None, beta: float = 0.05, seed: int | None = None,
                   out: str | os.PathLike | None = None, progress: bool = False, dataset=None,
                   guess_fractions=GUESS_FRACTIONS, score_draws: int = 32,
                   log=None) -> AuditReport:
    """Trains ``config`` (a TrainConfig) with ``canaries`` input canaries, each in the private set with
    probability 1/2, scores them with the released model and returns the one-run bound beside the
    accountant's epsilon for the run (see the module doc). ``canaries`` None: one per spatial frequency
    of the run's images (99 at 14 x 14), the most :func:`make_canaries` makes. ``out``: the training run
    goes to out/train (a fresh directory: a resumed run would mix two draws of the coins); None: a
    temporary directory.
    ``seed`` pins the coins and the engine (tests only: a known engine seed voids the run's privacy).
    ``dataset``: the private data set before subset/resolution (default: the config's data_dir)."""
    from .diffusion.presets import ConfigError
    from .diffusion.trainer import load_denoiser, trainer_class

    cfg = config
    check_auditable(cfg)
    if canaries is not None and not (isinstance(canaries, int) and canaries >= 2):
        raise ValueError(f"canaries must be an integer >= 2, got {canaries!r}")
    if cfg.resolution is not None:  # else checked when the data's shape is known, still before training
        most = len(canary_frequencies((1, cfg.resolution, cfg.resolution)))
        canaries = most if canaries is None else canaries
        if canaries > most:
            raise ConfigError(f"{cfg.resolution}x{cfg.resolution} images have {most} distinct spatial frequencies, "
                              f"so at most {most} canaries; got {canaries}")
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta!r}")
    fractions = tuple(guess_fractions)
    if not fractions or not all(0 < f <= 0.5 for f in fractions):
        raise ValueError(f"guess_fractions must be in (0, 0.5], got {fractions}")
    if seed is not None and not 0 <= seed < 2**62:
        raise ValueError(f"seed must be in [0, 2**62), got {seed}")
    # The coins: their own generator, from the audit seed or the OS, never from the engine's seed.
    coin_seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    # mixed with a constant, so a pinned seed never gives the coins the stream of cfg.seed (model init)
    coins = torch.Generator().manual_seed((coin_seed * 0x9E3779B97F4A7C15 + 0xC0175) % 2**63)
    if seed is not None:  # pinned for a test: another number than the coins' seed, like audit_engine
        cfg = cfg.replace(noise_seed=2 * seed + 1)
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="dpfast-audit-")
        run_dir = Path(tmp.name) / "train"
    else:
        run_dir = Path(out) / "train"
        if (run_dir / "checkpoint.pt").exists():
            raise ConfigError(f"{run_dir} holds a training run already: an audit trains afresh (new coins), "
                              "use another --out")
    base_cls = trainer_class(cfg)
    made = {}  # the canaries and coins, once the data's image shape is known

    class CanaryTrainer(base_cls):
        """The recipe's trainer, with the canaries that are in appended to its private data set. Its
        rate q and step count come from N + m (real images plus every canary), fixed before the coins
        are drawn: each coin is then a plain add/remove under one Poisson rate, sigma and step count."""

        def _public_size(self, dataset):
            return made["public_size"]

        def _prepare_data(self, data):
            from .diffusion.data import ImageDataset

            real = super()._prepare_data(data)
            m = len(canary_frequencies(real.image_shape)) if canaries is None else canaries
            pats = make_canaries(m, real.image_shape)  # raises (before training) if m is too many
            included = torch.rand(m, generator=coins) < 0.5
            made.update(canaries=pats, included=included, public_size=len(real) + m)
            keep = pats[included]
            return ImageDataset(torch.cat([real.images, keep]),
                                torch.cat([real.labels, torch.full((len(keep),), CANARY_LABEL, dtype=torch.long)]),
                                real.num_classes, f"{real.name} + {len(keep)} canaries", real.classes_declared)

    try:
        trainer = CanaryTrainer(cfg, run_dir, dataset=dataset, progress=progress,
                                log=log if log is not None else ((lambda *a, **k: None) if not progress else print))
        result = trainer.train()
        report = result["report"]
        if report["steps"] < trainer.private_phase.steps:
            raise RuntimeError(f"training stopped early ({result['reason']}): the audit needs the whole run")
        denoiser, meta = load_denoiser(run_dir)  # the released model (EMA weights), as a user gets it
        images = made["canaries"].float() / 127.5 - 1.0
        label = CANARY_LABEL if meta["num_classes"] else None
        losses = canary_losses(denoiser, images, label, draws=score_draws, p_mean=cfg.p_mean, p_std=cfg.p_std,
                               sigma_range=cfg.sigma_range_values())
    finally:
        if tmp is not None:
            tmp.cleanup()
    scores, included = -losses, made["included"]  # lower loss: guess "in"
    canaries = len(included)
    lower, r, v = best_bound(scores, included, fractions, beta, cfg.delta)
    n_real = report["dataset_size"] - int(included.sum())
    note = (f"black-box input canaries: {canaries} gratings (class {CANARY_LABEL}), "
            f"{int(included.sum())} in, beside {n_real} real images; score = -(denoising loss of the "
            f"released EMA model over {score_draws} fixed (sigma, noise) draws); recipe {cfg.recipe}")
    # every guess right: the most this many canaries can certify; a claim above it cannot be refuted
    cap = max(epsilon_lower_bound(2 * max(1, int(f * canaries)), 2 * max(1, int(f * canaries)),
                                  beta=beta / len(fractions), delta=cfg.delta, m=canaries) for f in fractions)
    note += (f"; the most {canaries} canaries can certify is eps >= {cap:.2f}"
             + (": below the claim, so this audit cannot refute it" if cap <= float(report["epsilon"]) else ""))
    return AuditReport(epsilon_lower=lower, epsilon_claimed=float(report["epsilon"]), delta=cfg.delta, beta=beta,
                       canaries=canaries, guesses=r, correct=v, steps=int(report["steps"]),
                       noise_multiplier=float(report["noise_multiplier"]), sample_rate=float(report["sample_rate"]),
                       scores_in=scores[included].tolist(), scores_out=scores[~included].tolist(), note=note)


def mean_gap(report: AuditReport) -> float:
    """(mean score in - mean score out) / pooled std: how far apart the two groups are (diagnostics)."""
    a, b = torch.tensor(report.scores_in), torch.tensor(report.scores_out)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    return float((a.mean() - b.mean()) / torch.cat([a - a.mean(), b - b.mean()]).std())
