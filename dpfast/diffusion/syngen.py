"""DP-SynGen (Choi et al.): the coarse or the cleaning stage of diffusion learned from generated
images, so that DP-SGD is spent on the rest only.

A diffusion model's noise levels fall into three stages: coarse (high noise: the layout), context
(middle: what the image is), cleaning (low noise: edges and texture). The coarse and cleaning
stages can be learned from programmatically generated images (`dpfast.diffusion.synthetic`), which
carry no private information. A DP-SynGen run is two phases (`dpfast.diffusion.phases`):

- ``coarse``:   public phase on generated images at sigma > tau, private phase at sigma <= tau;
- ``cleaning``: public phase on generated images at sigma <= tau, private phase at sigma > tau;
- ``finetune``: public phase on generated images at every sigma, then DP fine-tuning at every sigma.

With stage experts (the default for coarse and cleaning) the public phase's model is kept, frozen,
as the expert of its stage, and the sampler switches between it and the private model at tau
(`StageExperts`). Without them one model trains through both phases and samples alone.

The threshold tau. The paper reads it off the elbow points of alpha-bar and the SNR over the
schedule. EDM's x = y + sigma n is DDPM's x_t / sqrt(alpha_bar_t) with sigma = sqrt((1 - alpha_bar) /
alpha_bar), so alpha_bar(sigma) = 1 / (1 + sigma^2) and SNR(sigma) = alpha_bar / (1 - alpha_bar) =
1 / sigma^2, over the sampler's noise schedule
sigma(t) = (sigma_min^(1/rho) + t (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho, t in [0, 1].
alpha_bar(t) is a falling S curve with two elbows, found by the Kneedle rule (the points farthest
above and below the chord of the normalised curve): the one near t=0 is where the signal starts to
go (below it: cleaning), the one near t=1 where it is gone (above it: coarse). The paper's exact
procedure (its code reads tau from a config) could not be sourced; this rule is ours, the plot of
`dpfast syngen-threshold` shows both curves, and --tau overrides it.

Privacy: tau depends on the sampler's constants only. The generated images depend on a seed only.
The public phase's updates, and the expert it leaves, are functions of them and of the model's
initial weights: no private data, no privacy cost. The private phase is plain DP-SGD through the
engine on the private data, and the only accountant phase. The released sampler (the private model,
with the public expert at the other stage) is post-processing of the private model and public
objects, so its epsilon is the private phase's. `tests/diffusion/test_syngen.py` checks the
accounting, that the generators never read a file, and that the expert is bit-identical whatever the
private data.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

VARIANTS = ("coarse", "cleaning", "finetune")


def schedule_curves(sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                    points: int = 2001) -> dict:
    """t (0: data, 1: noise), sigma(t), alpha_bar(t), SNR(t) over the sampler's schedule (float64)."""
    t = torch.linspace(0, 1, points, dtype=torch.float64)
    sigma = (sigma_min ** (1 / rho) + t * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho
    return {"t": t, "sigma": sigma, "alpha_bar": 1 / (1 + sigma ** 2), "snr": 1 / sigma ** 2}


def kneedle(x: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """Indices of the points of the curve (x, y), both normalised to [0, 1], farthest above and
    farthest below the chord from its first to its last point (the Kneedle elbows)."""
    xn = (x - x.min()) / (x.max() - x.min())
    yn = (y - y.min()) / (y.max() - y.min())
    above = yn - (yn[0] + (yn[-1] - yn[0]) * (xn - xn[0]) / (xn[-1] - xn[0]))
    return int(above.argmax()), int(above.argmin())


def thresholds(sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> dict:
    """The two elbows of alpha_bar over the schedule: {"cleaning": sigma, "coarse": sigma, "t_...": t}."""
    c = schedule_curves(sigma_min, sigma_max, rho)
    hi, lo = kneedle(c["t"], c["alpha_bar"])   # a falling S: above the chord early, below it late
    i_clean, i_coarse = sorted((hi, lo))
    return {"cleaning": float(c["sigma"][i_clean]), "coarse": float(c["sigma"][i_coarse]),
            "t_cleaning": float(c["t"][i_clean]), "t_coarse": float(c["t"][i_coarse]),
            "alpha_bar_cleaning": float(c["alpha_bar"][i_clean]), "alpha_bar_coarse": float(c["alpha_bar"][i_coarse]),
            "rule": "Kneedle elbows of alpha_bar(t) = 1/(1+sigma(t)^2) over the sampler's schedule",
            "schedule": {"sigma_min": sigma_min, "sigma_max": sigma_max, "rho": rho}}


def stage_mass(lo: float, hi: float, p_mean: float = -1.2, p_std: float = 1.2) -> float:
    """The share of the training noise levels (ln sigma ~ N(p_mean, p_std^2)) in [lo, hi]."""
    def cdf(s):
        return 0.0 if s <= 0 else 1.0 if math.isinf(s) else 0.5 * (1 + math.erf((math.log(s) - p_mean) / (p_std * math.sqrt(2))))
    return cdf(hi) - cdf(lo)


def stage_ranges(variant: str, tau: float) -> tuple[tuple | None, tuple | None]:
    """(public phase's sigma range, private phase's) of a DP-SynGen variant; None: every sigma."""
    if variant == "coarse":
        return (tau, math.inf), (0.0, tau)
    if variant == "cleaning":
        return (0.0, tau), (tau, math.inf)
    if variant == "finetune":
        return None, None
    raise ValueError(f"--syngen must be one of {', '.join(VARIANTS)}; got {variant!r}")


def plot_thresholds(path, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                    tau: float | None = None) -> None:
    """alpha_bar and SNR over the schedule, the stages, and the thresholds (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = schedule_curves(sigma_min, sigma_max, rho)
    th = thresholds(sigma_min, sigma_max, rho)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(c["t"], c["alpha_bar"], color="C0", label=r"$\bar\alpha(t)$")
    ax.set_xlabel("diffusion time t (0: data, 1: noise) on the sampler's schedule")
    ax.set_ylabel(r"$\bar\alpha = 1 / (1 + \sigma^2)$", color="C0")
    ax2 = ax.twinx()
    ax2.semilogy(c["t"], c["snr"], color="C1", label="SNR")
    ax2.set_ylabel(r"SNR $= 1 / \sigma^2$ (log)", color="C1")
    for name, colour in (("cleaning", "C2"), ("coarse", "C3")):
        t = th[f"t_{name}"]
        ax.axvline(t, color=colour, ls="--")
        ax.text(t, 0.3 if name == "cleaning" else 0.7, f" {name} elbow\n sigma={th[name]:.3g}", color=colour, fontsize=8)
    ax.axvspan(0, th["t_cleaning"], color="C2", alpha=0.08)
    ax.axvspan(th["t_coarse"], 1, color="C3", alpha=0.08)
    if tau is not None:
        t_tau = float(c["t"][int((c["sigma"] - tau).abs().argmin())])
        ax.axvline(t_tau, color="k", lw=1.5, label=f"tau = {tau:.3g} (override)")
    ax.set_title("DP-SynGen stages: cleaning | context | coarse")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class StageExperts(nn.Module):
    """One denoiser from several: each row is denoised by the expert whose noise-level range holds
    its sigma (lo < sigma <= hi), or by the main model. `sample_images` and every sampler use it as
    a plain EDM denoiser, so the sampler switches at tau. experts: (lo, hi, model, unconditional);
    an unconditional expert (trained on unlabelled images) is given the null label."""

    def __init__(self, main: nn.Module, experts: list[tuple[float, float, nn.Module, bool]]):
        super().__init__()
        self.main = main
        self.ranges = [(float(lo), float(hi)) for lo, hi, _, _ in experts]
        self.unconditional = [bool(u) for _, _, _, u in experts]
        self.experts = nn.ModuleList([m for _, _, m, _ in experts])

    @property
    def num_classes(self) -> int:
        return self.main.num_classes

    @property
    def sigma_data(self) -> float:
        return self.main.sigma_data

    def owner(self, sigma: torch.Tensor) -> torch.Tensor:
        """(N,) index of the expert serving each sigma, -1 for the main model."""
        owner = torch.full(sigma.shape, -1, dtype=torch.long, device=sigma.device)
        for i, (lo, hi) in enumerate(self.ranges):
            owner[(owner < 0) & (sigma > lo) & (sigma <= hi)] = i
        return owner

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        owner = self.owner(sigma)
        out = torch.empty_like(x)
        for i, model in [(-1, self.main), *enumerate(self.experts)]:
            rows = owner == i
            if not rows.any():
                continue
            labels = None if class_labels is None else class_labels[rows]
            if labels is not None and i >= 0 and self.unconditional[i]:
                labels = torch.full_like(labels, self.num_classes)
            out[rows] = model(x[rows], sigma[rows], labels)
        return out
