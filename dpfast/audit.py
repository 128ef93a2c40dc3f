"""Empirical privacy auditing in one training run (Steinke, Nasr and Jagielski, NeurIPS 2023).

m canaries are each put in the training set independently with probability 1/2 (S_i = +1 in, -1 out).
After training, an auditor scores every canary and guesses: the ``k_plus`` highest scores "in", the
``k_minus`` lowest "out", abstaining on the rest. If the training run is (eps, delta)-DP, the number of
correct guesses among the r = k_plus + k_minus made is stochastically dominated by a binomial with
success probability e^eps / (1 + e^eps) (plus a delta term), so a count too large for that binomial
at confidence 1 - beta is evidence that eps is larger: :func:`epsilon_lower_bound` is the largest eps
the observed count refutes. It is a *lower* bound: a correct mechanism gives one below its claimed
epsilon except with probability at most beta (over the canaries' coin flips and the run's noise), and
a mechanism that leaks more than it claims shows up as a lower bound above the claim.

:func:`audit_engine` is the white-box audit of dpfast's own mechanism, the strongest setting: Dirac
canaries (canary i's gradient is ``c * e_i``, c >= max_grad_norm, so clipping leaves it at norm C
along coordinate i) pass through the engine's real Poisson sampler, per-sample clipping, noise and
accountant, on a linear model whose gradient is its input; the other records have zero gradient. The
score of canary i is coordinate i of the sum of all model updates, which is what the adversary of
DP-SGD sees. It audits the engine's mechanism (sampler, clipping, noise, accountant) on the torch
backend, fp32, one chunk per step, in one process or under an initialised process group (torchrun,
gloo or NCCL: every rank holds the whole canary set, dpfast's loader gives each rank its members of
every Poisson batch, the ranks all-reduce their clipped sums and hold the same released model, so
every rank reports the same audit); other rules, backends and physical chunking are covered by the
exactness tests, not by this audit.

:func:`audit_batch_normalisation` audits what the noisy sum is divided by (``loss_reduction="mean"``),
which one run cannot see (the divisor scales every canary's signal and noise alike): many independent
one-step releases with one canary each, scored by the divisor read off the noise's scale. See its
docstring for the privacy argument and why it gives the engine a fixed normaliser at q = 1.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["epsilon_lower_bound", "audit_engine", "audit_batch_normalisation", "AuditReport", "guess_counts"]


def _log_binom_tail(r: int, v: int, lp: float, lq: float) -> float:
    """log P[Binomial(r, p) >= v] from log p and log(1 - p), exactly (log-sum-exp over the terms)."""
    if v <= 0:
        return 0.0
    if v > r:
        return -math.inf
    terms = [math.lgamma(r + 1) - math.lgamma(k + 1) - math.lgamma(r - k + 1) + k * lp + (r - k) * lq
             for k in range(v, r + 1)]
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms))


def epsilon_lower_bound(r: int, v: int, *, beta: float = 0.05, delta: float = 0.0, m: int | None = None,
                        tol: float = 1e-6) -> float:
    """The largest eps for which ``v`` correct guesses out of ``r`` would have probability below
    ``beta`` under (eps, delta)-DP: a lower bound on the run's true eps at confidence 1 - beta (0.0
    when the count refutes nothing)."""
    if not (isinstance(r, int) and isinstance(v, int) and 0 <= v <= r):
        raise ValueError(f"need integers 0 <= v <= r, got r={r!r}, v={v!r}")
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta!r}")
    if delta < 0 or delta >= 1:
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    if delta > 0 and (m is None or m < r):
        raise ValueError("with delta > 0 pass m, the number of canaries (>= r): the delta term grows with it")
    if r == 0:
        return 0.0

    def refuted(eps: float) -> bool:
        return _tail_bound(r, v, eps, delta, m if m is not None else r) < beta  # m only matters if delta > 0

    if not refuted(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while refuted(hi):
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return math.inf
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if refuted(mid) else (lo, mid)
    return lo


def _tail_bound(r: int, v: int, eps: float, delta: float, m: int) -> float:
    """An upper bound on P[correct >= v] for r guesses of an (eps, delta)-DP run (see module doc)."""
    lp, lq = -math.log1p(math.exp(-eps)), -math.log1p(math.exp(eps)) if eps < 700 else -eps
    pure = math.exp(_log_binom_tail(r, v, lp, lq))
    if delta == 0:
        return pure
    return _delta_tail_bound(r, v, lp, lq, delta, m, pure)


def _delta_tail_bound(r, v, lp, lq, delta, m, pure):
    """Steinke et al.'s (eps, delta) bound: P[W >= v] <= P[B >= v] + 2 m delta max_{1<=i<=v} P[v > B >= v-i] / i,
    B ~ Binomial(r, p). The max is over a running sum of the pmf below v."""
    alpha, acc = 0.0, 0.0
    for i in range(1, v + 1):
        k = v - i
        acc += math.exp(math.lgamma(r + 1) - math.lgamma(k + 1) - math.lgamma(r - k + 1) + k * lp + (r - k) * lq)
        alpha = max(alpha, acc / i)
    return min(1.0, pure + 2 * m * delta * alpha)


@dataclasses.dataclass
class AuditReport:
    """What an audit measured: the lower bound beside the accountant's claim, and the evidence."""

    epsilon_lower: float        # at confidence 1 - beta
    epsilon_claimed: float      # the accountant's upper bound for the same run
    delta: float
    beta: float
    canaries: int               # m
    guesses: int                # r
    correct: int                # v
    steps: int
    noise_multiplier: float
    sample_rate: float
    scores_in: list[float]
    scores_out: list[float]
    note: str = ""
    world_size: int = 1         # ranks of the process group the audited run used

    @property
    def violated(self) -> bool:
        """The audit refutes the claim: the lower bound is above the claimed epsilon."""
        return self.epsilon_lower > self.epsilon_claimed

    def summary(self) -> str:
        verdict = ("VIOLATION: the run leaks more than its accountant claims" if self.violated
                   else "consistent with the claim")
        return (f"empirical epsilon >= {self.epsilon_lower:.3f} at confidence {1 - self.beta:.2f} "
                f"(claimed {self.epsilon_claimed:.3f} at delta={self.delta:g}): {verdict}; "
                f"{self.correct}/{self.guesses} guesses correct over {self.canaries} canaries, {self.steps} steps")


def guess_counts(scores: torch.Tensor, included: torch.Tensor, k_plus: int, k_minus: int) -> tuple[int, int]:
    """(r, v): guess "in" for the ``k_plus`` highest scores, "out" for the ``k_minus`` lowest."""
    order = torch.argsort(scores, descending=True)
    guess_in, guess_out = order[:k_plus], order[len(order) - k_minus:] if k_minus else order[:0]
    v = int(included[guess_in].sum()) + int((~included[guess_out]).sum())
    return k_plus + k_minus, v


GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5)  # k_plus = k_minus = fraction x m; beta split over them


def audit_engine(*, steps: int, noise_multiplier: float | None = None, target_epsilon: float | None = None,
                 canaries: int = 1000, sample_rate: float = 0.5, others: int = 0, max_grad_norm: float = 1.0,
                 canary_norm: float | None = None, delta: float = 1e-5, beta: float = 0.05,
                 guess_fractions=GUESS_FRACTIONS, seed: int | None = None, accountant: str = "prv",
                 progress: bool = False) -> AuditReport:
    """White-box one-run audit of the engine (see the module doc), at ``noise_multiplier`` or at the
    sigma the accountant calibrates for ``target_epsilon`` over ``steps``. For each fraction f in
    ``guess_fractions`` the auditor guesses the f x m highest scores "in" and the f x m lowest "out";
    each guess set is tested at beta / len(guess_fractions) (a union bound), and the largest bound is
    reported, so the whole report holds at confidence 1 - beta."""
    from . import PrivacyEngine
    from .accounting import calibrate_noise_multiplier

    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("pass exactly one of noise_multiplier or target_epsilon")
    if target_epsilon is not None:
        noise_multiplier = calibrate_noise_multiplier(target_epsilon, delta, sample_rate, steps=steps,
                                                      accountant=accountant)
    fractions = tuple(guess_fractions)
    if not fractions or not all(0 < f <= 0.5 for f in fractions):
        raise ValueError(f"guess_fractions must be in (0, 0.5], got {fractions}")

    if canaries < 2:
        raise ValueError(f"canaries must be >= 2, got {canaries}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    c = max_grad_norm * 2.0 if canary_norm is None else float(canary_norm)
    if c < max_grad_norm:
        raise ValueError("canary_norm must be >= max_grad_norm: a canary must use its whole clip budget")
    world, rank = _process_group()
    if world > 1 and seed is None:
        # the canary coins and the engine seed must be the same on every rank: rank 0's OS-drawn seed
        seed = _rank0_seed()
    g = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    engine_seed = int.from_bytes(os.urandom(8), "little") if seed is None else seed * 2 + 1
    included = torch.rand(canaries, generator=g) < 0.5
    # Dirac canaries: record j of the data set is (row, weight); its loss weight * emb(row) has gradient
    # weight * e_row on the embedding table. Canaries weigh c; the other records use row m, weight 0.
    rows = torch.cat([included.nonzero().flatten(), torch.full((others,), canaries)])
    weights = torch.cat([torch.full((int(included.sum()),), c), torch.zeros(others)])
    data = TensorDataset(rows, weights)
    model = nn.Embedding(canaries + 1, 1)  # fp32: the path users train on
    nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = PrivacyEngine(accountant=accountant, seed=engine_seed)
    # every rank holds the whole canary data set; dpfast's loader keeps rank r's members (index % world
    # == r) of each Poisson batch, and the loader's batch_size is per rank (q is passed explicitly)
    batch = max(1, round(sample_rate * len(data) / world))
    m, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=batch),
                                         noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                         sample_rate=sample_rate, loss_reduction="sum", backend="torch")
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="audit", unit="step")
    done = 0
    while done < steps:
        for rb, wb in loader:
            opt.zero_grad()
            if len(rb):
                (m(rb).flatten() * wb).sum().backward()
            if opt.step():
                done += 1
                if bar is not None:
                    bar.update(1)
                if done == steps:
                    break
    if bar is not None:
        bar.close()
    scores = -model.weight.detach().flatten()[:canaries]  # the sum of all released gradients along e_i
    if world > 1 and not _same_on_every_rank(model.weight.detach()):
        # dpfast's ranks hold bitwise the same parameters (one all-reduce, the same noise); if they do
        # not, each rank's model is a release of its own, and an adversary who sees them all sees more
        # than any one rank's scores: no single-release bound would be an honest audit of the run
        raise RuntimeError("the ranks hold different models after training: the run released more than one "
                           "model, which this audit cannot score (the engine keeps ranks identical)")
    lower, r, v = best_bound(scores, included, fractions, beta, delta)
    return AuditReport(epsilon_lower=lower, epsilon_claimed=engine.get_epsilon(delta), delta=delta, beta=beta,
                       canaries=canaries, guesses=r, correct=v, steps=steps, noise_multiplier=noise_multiplier,
                       sample_rate=sample_rate, scores_in=scores[included].tolist(),
                       scores_out=scores[~included].tolist(), world_size=world)


def best_bound(scores, included, fractions, beta: float, delta: float) -> tuple[float, int, int]:
    """(lower bound, guesses, correct) of the best guess set: for each fraction f the f x m highest
    scores guessed "in" and the f x m lowest "out", each tested at beta / len(fractions) (a union
    bound, so the largest of them holds at confidence 1 - beta)."""
    m, best = len(scores), (0.0, 0, 0)
    for f in fractions:
        k = max(1, int(f * m))
        r, v = guess_counts(scores, included, k, k)
        lower = epsilon_lower_bound(r, v, beta=beta / len(fractions), delta=delta, m=m)
        if lower >= best[0]:
            best = (lower, r, v)
    return best


def _process_group() -> tuple[int, int]:
    """(world size, rank) of the initialised default process group; (1, 0) without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _rank0_seed() -> int:
    """An OS-drawn seed in [0, 2**63), rank 0's on every rank."""
    from .distributed import _comm_device

    t = torch.tensor([int.from_bytes(os.urandom(8), "little") >> 1], dtype=torch.int64, device=_comm_device(None))
    torch.distributed.broadcast(t, src=0)
    return int(t.item())


def _same_on_every_rank(x: torch.Tensor) -> bool:
    """Whether every rank holds bitwise the same ``x`` (a CPU tensor), by comparing with rank 0's."""
    from .distributed import _comm_device

    ref = x.detach().clone().to(_comm_device(None))
    torch.distributed.broadcast(ref, src=0)
    differs = torch.tensor([float(not torch.equal(ref.cpu(), x.detach().cpu()))], device=ref.device)
    torch.distributed.all_reduce(differs)
    return differs.item() == 0


def audit_batch_normalisation(*, noise_multiplier: float | None = None, target_epsilon: float | None = None,
                              runs: int = 2000, others: int = 1, noise_coordinates: int = 1024,
                              max_grad_norm: float = 1.0, canary_norm: float | None = None, delta: float = 1e-5,
                              beta: float = 0.05, guess_fractions=GUESS_FRACTIONS, seed: int | None = None,
                              accountant: str = "prv") -> AuditReport:
    """White-box audit of what the released gradient is divided by (``loss_reduction="mean"``): it must
    be a constant that does not depend on the batch, never the realised batch size |B|.

    Why :func:`audit_engine` cannot see that bug: in one run, dividing the noisy sum by |B| scales every
    canary's signal and its noise alike, and |B| is one count shared by all canaries. What leaks is |B|
    itself, a count with sensitivity 1 and no noise. So this audit makes ``runs`` independent one-step
    releases with ONE canary each: release t trains ``others`` records with zero gradient and, with
    probability 1/2 (coin S_t), a Dirac canary (gradient ``c * e_0``, clipped to C), at q = 1, so
    |B| = others + S_t exactly; the engine is told the public normaliser ``others + 1`` (the
    ``expected_batch_size`` of make_private; no data loader, see below). Each release is scored twice:

    * "batch size": the realised divisor estimated from ``noise_coordinates`` coordinates that no
      record touches, which hold only the noise ``sigma * C * xi / divisor`` (sigma and C are public):
      divisor ~ sigma * C / rms, to a relative error of about 1 / sqrt(2 * noise_coordinates);
    * "canary": the canary's coordinate in units of the noise, S_t / sigma + xi (the ordinary signal,
      so the audit is not blind on a correct engine).

    Privacy argument: canary t affects release t only, and the releases use independent noise (keys
    (seed, t)), so the whole sequence is (eps, delta)-DP in each canary whenever one step is, with eps
    the accountant's claim for one step at q = 1. That is all the bound of Steinke et al. needs (m
    canaries with independent coins; here m = ``runs``), so :func:`epsilon_lower_bound` applies to any
    score; the three scores (the divisor in both directions) and the guess sets share beta (a union
    bound). The releases come from one
    PrivacyEngine (one release per step, the weights reset between them: an embedding's gradient does
    not depend on its weights), and the claim is the accountant's epsilon after the first.

    Scope, and why q = 1 with a given normaliser: dpfast divides by a constant (a loader's batch size,
    or ``expected_batch_size``). It used to divide a loader's step by q * |D|, which changes with the
    canary under add/remove adjacency; this audit's score found it (tests/test_privacy_hardening.py
    keeps that audit on the loader path). At q = 1 the realised |B| would then be |D|, the same as
    q * |D|, so the bug shows only against a normaliser that is fixed in advance. And at q < 1 the
    other records' Binomial count hides the canary's +1 (the leak is then of order
    1 / sqrt(others * q * (1 - q)) per step): still outside the accountant's analysis, but beyond an
    audit's power. ``others >= 1``: with no other record an empty batch's
    divisor (max(1, 0)) equals a batch of one's. It audits the optimizer's normalisation, noise,
    clipping and accountant on the torch backend, fp32, one process; not the Poisson sampler."""
    from . import PrivacyEngine
    from .accounting import calibrate_noise_multiplier

    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("pass exactly one of noise_multiplier or target_epsilon")
    if target_epsilon is not None:
        noise_multiplier = calibrate_noise_multiplier(target_epsilon, delta, 1.0, steps=1, accountant=accountant)
    if not noise_multiplier > 0:
        raise ValueError("the batch-size score reads the noise: noise_multiplier must be > 0")
    fractions = tuple(guess_fractions)
    if not fractions or not all(0 < f <= 0.5 for f in fractions):
        raise ValueError(f"guess_fractions must be in (0, 0.5], got {fractions}")
    if runs < 2 or others < 1 or noise_coordinates < 1:
        raise ValueError(f"need runs >= 2, others >= 1, noise_coordinates >= 1; got {runs}, {others}, "
                         f"{noise_coordinates}")
    c = max_grad_norm * 2.0 if canary_norm is None else float(canary_norm)
    if c < max_grad_norm:
        raise ValueError("canary_norm must be >= max_grad_norm: a canary must use its whole clip budget")
    g = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    engine_seed = int.from_bytes(os.urandom(8), "little") if seed is None else seed * 2 + 1
    included = torch.rand(runs, generator=g) < 0.5
    # row 0: the canary's direction; row 1: the other records (weight 0: zero gradient, but each is a
    # sample of the batch); rows 2..: touched by no record, pure noise
    model = nn.Embedding(2 + noise_coordinates, 1)
    nn.init.zeros_(model.weight)
    engine = PrivacyEngine(accountant=accountant, seed=engine_seed)
    m, opt, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                    noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                    expected_batch_size=float(others + 1), sample_rate=1.0,
                                    loss_reduction="mean", backend="torch")
    std = noise_multiplier * max_grad_norm
    divisor, canary = torch.empty(runs), torch.empty(runs)
    claimed = None
    for t in range(runs):
        rows = torch.tensor([0] * int(included[t]) + [1] * others)
        weights = torch.tensor([c] * int(included[t]) + [0.0] * others)
        opt.zero_grad()
        (m(rows).flatten() * weights).mean().backward()
        if not opt.step():
            raise RuntimeError("the engine took no step")  # one chunk per logical batch: never
        if claimed is None:
            claimed = engine.get_epsilon(delta)  # one release: the claim for each run
        with torch.no_grad():
            released = -model.weight.detach().flatten().double()  # lr 1 from 0: the released gradient
            model.weight.zero_()
        rms = released[2:].square().mean().sqrt().item()
        divisor[t] = std / rms
        canary[t] = released[0].item() / rms
    best = (0.0, 0, 0, "canary", canary)
    # the divisor may grow or shrink with the canary: both directions are scores (beta over 3 x F)
    scored = (("canary", canary), ("batch size", divisor), ("batch size, reversed", -divisor))
    for name, scores in scored:
        for f in fractions:
            k = max(1, int(f * runs))
            r, v = guess_counts(scores, included, k, k)
            lower = epsilon_lower_bound(r, v, beta=beta / (len(scored) * len(fractions)), delta=delta, m=runs)
            if lower > best[0]:
                best = (lower, r, v, name, scores)
    lower, r, v, name, scores = best
    return AuditReport(epsilon_lower=lower, epsilon_claimed=claimed, delta=delta, beta=beta, canaries=runs,
                       guesses=r, correct=v, steps=1, noise_multiplier=noise_multiplier, sample_rate=1.0,
                       scores_in=scores[included].tolist(), scores_out=scores[~included].tolist(),
                       note=f"{runs} independent one-step releases, one canary each; bound from the {name} score")


def plot_scores(report: AuditReport, path,
                xlabel: str = "canary score (sum of released updates along the canary)") -> None:
    """Histogram of the canaries' scores, in vs out, with the bound in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    both = report.scores_in + report.scores_out
    bins = torch.linspace(min(both), max(both), 40).tolist() if both else 10
    ax.hist(report.scores_out, bins=bins, alpha=0.6, label=f"out ({len(report.scores_out)})")
    ax.hist(report.scores_in, bins=bins, alpha=0.6, label=f"in ({len(report.scores_in)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("canaries")
    ax.set_title(f"eps >= {report.epsilon_lower:.2f} (conf. {1 - report.beta:.2f}); claimed {report.epsilon_claimed:.2f}",
                 fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- CLI
def add_commands(subparsers) -> None:
    """``dpfast audit``: the white-box one-run audit of the engine (--epsilon / --noise-multiplier), or
    the black-box input-canary audit of a training preset (--preset, dpfast.audit_input)."""
    from .accounting.cli import _positive_float, _positive_int

    p = subparsers.add_parser(
        "audit", help="empirical lower bound on epsilon: one-run audit of the engine or of a training preset",
        description="White-box (--epsilon or --noise-multiplier): trains Dirac gradient canaries (each in the "
                    "data with probability 1/2) through dpfast's real sampler, clipping, noise and accountant and "
                    "guesses which were in from the released updates. Black-box (--preset NAME): a full `dpfast "
                    "train` run of the preset with input canaries (stripe images, each in the private data with "
                    "probability 1/2), guessed from the trained model's denoising loss. Both report the epsilon "
                    "lower bound of Steinke, Nasr and Jagielski (2023) beside the accountant's claim; a lower "
                    "bound above the claim means the run leaks more than it says (exit status 1). Writes "
                    "audit.json and audit_scores.png to --out (and, with --preset, the training run to out/train).")
    level = p.add_mutually_exclusive_group(required=True)
    level.add_argument("--epsilon", type=_positive_float, help="the claimed epsilon to calibrate sigma for")
    level.add_argument("--noise-multiplier", type=_positive_float, metavar="SIGMA")
    level.add_argument("--preset", metavar="NAME",
                       help="black-box audit of this training preset (as dpfast train --preset NAME)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="DP-SGD steps (default: 1; with --preset the preset's)")
    p.add_argument("--sample-rate", type=_positive_float, default=None, help="Poisson rate q (default: 1.0; "
                   "not with --preset, whose rate is batch_size / data-set size)")
    p.add_argument("--canaries", type=_positive_int, default=None,
                   help="m (default: 50000; with --preset one per spatial frequency, 99 at 14x14)")
    p.add_argument("--subset", type=_positive_int, default=None,
                   help="with --preset: train on the first N real images (plus the canaries)")
    p.add_argument("--delta", type=_positive_float, default=None, help="(default: 1e-5; with --preset the preset's)")
    p.add_argument("--beta", type=_positive_float, default=0.05, help="1 - confidence (default: 0.05)")
    p.add_argument("--seed", type=int, default=None, help="canary coins and engine seed (default: from the OS)")
    p.add_argument("--out", default=None, help="folder for audit.json and audit_scores.png")
    p.set_defaults(func=run_audit)


def _audit_preset(args):
    """The black-box audit's report for ``args`` (dpfast.audit_input); ValueError before any training."""
    from .audit_input import audit_training, check_auditable
    from .diffusion.presets import PRESETS, get_preset

    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    if args.sample_rate is not None:
        raise ValueError("--sample-rate is the white-box audit's: a preset's rate is batch_size / data-set size")
    overrides = {k: v for k, v in (("steps", args.steps), ("subset", args.subset), ("delta", args.delta))
                 if v is not None}
    cfg = get_preset(args.preset, **overrides)
    check_auditable(cfg)
    if args.canaries is not None and args.canaries < 10:
        raise ValueError("--canaries must be >= 10 (the bound needs many guesses)")
    return audit_training(cfg, canaries=args.canaries, beta=args.beta, seed=args.seed, out=args.out, progress=True)


def run_audit(args) -> int:
    import json
    import sys
    from pathlib import Path

    black_box = args.preset is not None
    if not black_box:
        if args.subset is not None:
            print("dpfast audit: error: --subset needs --preset", file=sys.stderr)
            return 2
        args.steps = 1 if args.steps is None else args.steps
        args.sample_rate = 1.0 if args.sample_rate is None else args.sample_rate
        args.canaries = 50000 if args.canaries is None else args.canaries
        args.delta = 1e-5 if args.delta is None else args.delta
    if args.sample_rate is not None and args.sample_rate > 1:
        print("dpfast audit: error: --sample-rate must be in (0, 1]", file=sys.stderr)
        return 2
    if not 0 < args.beta < 1 or args.delta is not None and not 0 < args.delta < 1:
        print("dpfast audit: error: --beta and --delta must be in (0, 1)", file=sys.stderr)
        return 2
    if not black_box and args.canaries < 100:
        print("dpfast audit: error: --canaries must be >= 100 (the bound needs many guesses)", file=sys.stderr)
        return 2
    if args.seed is not None and not 0 <= args.seed < (2**62 if black_box else 2**63):
        print(f"dpfast audit: error: --seed must be in [0, 2**{62 if black_box else 63})", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else None
    try:
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)  # before the audit: a bad --out fails at once
        if black_box:
            report = _audit_preset(args)
        else:
            report = audit_engine(steps=args.steps, noise_multiplier=args.noise_multiplier,
                                  target_epsilon=args.epsilon, canaries=args.canaries, sample_rate=args.sample_rate,
                                  delta=args.delta, beta=args.beta, seed=args.seed, progress=True)
    except (ValueError, OSError, RuntimeError) as e:  # rc 1 means a violation: a failure is 2
        print(f"dpfast audit: error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    if out is not None:
        d = dataclasses.asdict(report)
        d.pop("scores_in"), d.pop("scores_out")
        d["violated"] = report.violated
        (out / "audit.json").write_text(json.dumps(d, indent=1))
        plot_scores(report, out / "audit_scores.png", **({"xlabel": "canary score (minus the released model's "
                                                         "denoising loss)"} if black_box else {}))
        print(f"wrote {out / 'audit.json'} and {out / 'audit_scores.png'}")
    return 1 if report.violated else 0
