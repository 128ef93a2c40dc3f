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
backend, fp32, in one process with one chunk per step; other rules, backends, physical chunking and
distributed runs are covered by the exactness tests, not by this audit.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["epsilon_lower_bound", "audit_engine", "AuditReport", "guess_counts"]


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
    batch = max(1, round(sample_rate * len(data)))
    m, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=batch),
                                         noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                         sample_rate=sample_rate, loss_reduction="sum", backend="torch")
    bar = None
    if progress:
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
    best = (0.0, 0, 0)
    for f in fractions:
        k = max(1, int(f * canaries))
        r, v = guess_counts(scores, included, k, k)
        lower = epsilon_lower_bound(r, v, beta=beta / len(fractions), delta=delta, m=canaries)
        if lower >= best[0]:
            best = (lower, r, v)
    lower, r, v = best
    return AuditReport(epsilon_lower=lower, epsilon_claimed=engine.get_epsilon(delta), delta=delta, beta=beta,
                       canaries=canaries, guesses=r, correct=v, steps=steps, noise_multiplier=noise_multiplier,
                       sample_rate=sample_rate, scores_in=scores[included].tolist(),
                       scores_out=scores[~included].tolist())


def plot_scores(report: AuditReport, path) -> None:
    """Histogram of the canaries' scores, in vs out, with the bound in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    both = report.scores_in + report.scores_out
    bins = torch.linspace(min(both), max(both), 40).tolist() if both else 10
    ax.hist(report.scores_out, bins=bins, alpha=0.6, label=f"out ({len(report.scores_out)})")
    ax.hist(report.scores_in, bins=bins, alpha=0.6, label=f"in ({len(report.scores_in)})")
    ax.set_xlabel("canary score (sum of released updates along the canary)")
    ax.set_ylabel("canaries")
    ax.set_title(f"eps >= {report.epsilon_lower:.2f} (conf. {1 - report.beta:.2f}); claimed {report.epsilon_claimed:.2f}",
                 fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- CLI
def add_commands(subparsers) -> None:
    """``dpfast audit``: the white-box one-run audit of the engine."""
    from .accounting.cli import _positive_float, _positive_int

    p = subparsers.add_parser(
        "audit", help="empirical lower bound on epsilon: white-box one-run audit of the engine",
        description="Trains Dirac gradient canaries (each in the data with probability 1/2) through dpfast's real "
                    "sampler, clipping, noise and accountant, guesses which were in from the released updates, "
                    "and reports the epsilon lower bound of Steinke, Nasr and Jagielski (2023) beside the "
                    "accountant's claim. A lower bound above the claim means the mechanism leaks more than it "
                    "says. Writes audit.json and audit_scores.png to --out.")
    level = p.add_mutually_exclusive_group(required=True)
    level.add_argument("--epsilon", type=_positive_float, help="the claimed epsilon to calibrate sigma for")
    level.add_argument("--noise-multiplier", type=_positive_float, metavar="SIGMA")
    p.add_argument("--steps", type=_positive_int, default=1, help="DP-SGD steps (default: 1)")
    p.add_argument("--sample-rate", type=_positive_float, default=1.0, help="Poisson rate q (default: 1.0)")
    p.add_argument("--canaries", type=_positive_int, default=50000, help="m (default: 50000)")
    p.add_argument("--delta", type=_positive_float, default=1e-5)
    p.add_argument("--beta", type=_positive_float, default=0.05, help="1 - confidence (default: 0.05)")
    p.add_argument("--seed", type=int, default=None, help="canary coins and engine seed (default: from the OS)")
    p.add_argument("--out", default=None, help="folder for audit.json and audit_scores.png")
    p.set_defaults(func=run_audit)


def run_audit(args) -> int:
    import json
    import sys
    from pathlib import Path

    if args.sample_rate > 1:
        print("dpfast audit: error: --sample-rate must be in (0, 1]", file=sys.stderr)
        return 2
    if not 0 < args.beta < 1 or not 0 < args.delta < 1:
        print("dpfast audit: error: --beta and --delta must be in (0, 1)", file=sys.stderr)
        return 2
    if args.canaries < 100:
        print("dpfast audit: error: --canaries must be >= 100 (the bound needs many guesses)", file=sys.stderr)
        return 2
    if args.seed is not None and not 0 <= args.seed < 2**63:
        print("dpfast audit: error: --seed must be in [0, 2**63)", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else None
    try:
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)  # before the audit: a bad --out fails at once
        report = audit_engine(steps=args.steps, noise_multiplier=args.noise_multiplier, target_epsilon=args.epsilon,
                              canaries=args.canaries, sample_rate=args.sample_rate, delta=args.delta,
                              beta=args.beta, seed=args.seed, progress=True)
    except (ValueError, OSError, RuntimeError) as e:  # rc 1 means a violation: a failure is 2
        print(f"dpfast audit: error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    if out is not None:
        d = dataclasses.asdict(report)
        d.pop("scores_in"), d.pop("scores_out")
        d["violated"] = report.violated
        (out / "audit.json").write_text(json.dumps(d, indent=1))
        plot_scores(report, out / "audit_scores.png")
        print(f"wrote {out / 'audit.json'} and {out / 'audit_scores.png'}")
    return 1 if report.violated else 0
