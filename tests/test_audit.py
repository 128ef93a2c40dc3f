"""dpfast.audit: the one-run lower bound (Steinke, Nasr and Jagielski 2023) and the white-box audit of
the engine. A correct mechanism's lower bound stays below its claimed epsilon; deliberately broken
mechanisms (switched on here only, by patching the engine) are flagged with a bound above it.

False alarms: each audit's bound exceeds the true epsilon with probability at most beta = 0.01 over
the canary coins and the noise; the runs here use fixed seeds, so CI is deterministic, and a seed that
happened to fail would be a 1-in-100 event per audit (a bound above the claim on the unbroken engine
is what the audit exists to catch)."""
import json
import math

import pytest
import torch

import dpfast.optimizer as opt_mod
from dpfast.audit import audit_batch_normalisation, audit_engine, epsilon_lower_bound, guess_counts
from dpfast.optimizer import DPOptimizer

BETA = 0.01
AUDIT = dict(canaries=50000, delta=1e-5, beta=BETA, guess_fractions=(0.005, 0.01, 0.02, 0.05, 0.1))


def test_the_bound_at_pure_dp_is_the_binomial_tail():
    # v = r correct: P[Bin(r, p) >= r] = p^r < beta  <=>  eps < log(p / (1 - p)) with p = beta^(1/r)
    for r in (10, 100, 1000):
        p = BETA ** (1 / r)
        assert epsilon_lower_bound(r, r, beta=BETA) == pytest.approx(math.log(p / (1 - p)), abs=1e-5)
    assert epsilon_lower_bound(100, 50, beta=BETA) == 0.0       # chance level refutes nothing
    assert epsilon_lower_bound(0, 0, beta=BETA) == 0.0
    # delta only weakens the bound, more with more canaries
    pure = epsilon_lower_bound(1000, 900, beta=BETA)
    assert epsilon_lower_bound(1000, 900, beta=BETA, delta=1e-5, m=1000) <= pure
    assert epsilon_lower_bound(1000, 900, beta=BETA, delta=1e-5, m=10**6) < \
        epsilon_lower_bound(1000, 900, beta=BETA, delta=1e-5, m=1000)
    with pytest.raises(ValueError):
        epsilon_lower_bound(10, 11)
    with pytest.raises(ValueError, match="pass m"):
        epsilon_lower_bound(1000, 900, beta=BETA, delta=1e-5)


def test_the_bound_matches_an_independent_implementation_of_the_p_value():
    """Steinke et al.'s Appendix D p-value written again with scipy's binomial; the bound is the eps
    where it crosses beta."""
    stats = pytest.importorskip("scipy.stats")
    from dpfast.audit import _tail_bound

    def p_value(m, r, v, eps, delta):
        q = 1 / (1 + math.exp(-eps))
        tail, alpha, acc = stats.binom.sf(v - 1, r, q), 0.0, 0.0
        for i in range(1, v + 1):
            acc += stats.binom.pmf(v - i, r, q)
            alpha = max(alpha, acc / i)
        return min(1.0, tail + 2 * m * delta * alpha)

    g = torch.Generator().manual_seed(3)
    for _ in range(60):
        r = int(torch.randint(1, 400, (1,), generator=g))
        v = int(torch.randint(0, r + 1, (1,), generator=g))
        m = r + int(torch.randint(0, 2000, (1,), generator=g))
        eps, delta = float(torch.rand(1, generator=g)) * 5, [0.0, 1e-6, 1e-4][int(torch.randint(0, 3, (1,), generator=g))]
        assert _tail_bound(r, v, eps, delta, m) == pytest.approx(p_value(m, r, v, eps, delta), rel=1e-8, abs=1e-300)
    lb = epsilon_lower_bound(300, 250, beta=BETA, delta=1e-5, m=5000)
    assert p_value(5000, 300, 250, lb, 1e-5) < BETA <= p_value(5000, 300, 250, lb + 1e-3, 1e-5)


def test_the_bound_holds_its_confidence_for_randomized_response():
    """eps-DP randomized response on each canary's bit: the bound exceeds the true eps in at most
    about beta of the runs (here beta = 0.1, 400 runs: a 5-sigma margin on the count)."""
    g = torch.Generator().manual_seed(0)
    eps, r, runs, beta = 1.0, 200, 400, 0.1
    p = math.exp(eps) / (1 + math.exp(eps))
    above = sum(epsilon_lower_bound(r, int((torch.rand(r, generator=g) < p).sum()), beta=beta) > eps
                for _ in range(runs))
    assert above <= beta * runs + 5 * math.sqrt(beta * (1 - beta) * runs)


def test_guess_counts():
    scores = torch.tensor([5.0, -3.0, 1.0, 0.0, 4.0])
    included = torch.tensor([True, False, True, False, False])
    assert guess_counts(scores, included, 2, 1) == (3, 2)   # in: 0 (yes), 4 (no); out: 1 (yes)


@pytest.mark.parametrize("eps,steps,q,seed", [(1.0, 1, 1.0, 0), (4.0, 4, 0.5, 1), (10.0, 8, 0.5, 2)])
def test_the_engine_passes_its_audit(eps, steps, q, seed):
    rep = audit_engine(target_epsilon=eps, steps=steps, sample_rate=q, seed=seed, **AUDIT)
    assert rep.epsilon_claimed == pytest.approx(eps, rel=0.02)
    assert not rep.violated and rep.epsilon_lower > 0.1, rep.summary()  # consistent, and not a blind audit


@pytest.fixture
def noise_divided_by_4(monkeypatch):
    orig = opt_mod.finalize_
    monkeypatch.setattr(opt_mod, "finalize_", lambda *a, noise_std, **k: orig(*a, noise_std=noise_std / 4, **k))


@pytest.fixture
def clipping_skipped(monkeypatch):
    orig = DPOptimizer._accumulate_chunk

    def unclipped(self, samples):
        C, self.max_grad_norm = self.max_grad_norm, 1e9  # clip factors of 1; the noise still uses C
        try:
            return orig(self, samples)
        finally:
            self.max_grad_norm = C

    monkeypatch.setattr(DPOptimizer, "_accumulate_chunk", unclipped)


def test_a_sampler_that_ignores_its_rate_is_flagged(monkeypatch):
    """Every record in every batch while the accountant charges q = 0.1 (no amplification happened)."""
    import dpfast.data

    monkeypatch.setattr(dpfast.data, "poisson_mask", lambda n, q, seed, step: torch.ones(n, dtype=torch.bool))
    rep = audit_engine(target_epsilon=1.0, steps=100, sample_rate=0.1, seed=0, **AUDIT)
    assert rep.violated, rep.summary()


def test_the_engine_passes_with_many_small_steps():
    rep = audit_engine(target_epsilon=1.0, steps=100, sample_rate=0.1, seed=0, **AUDIT)
    assert not rep.violated, rep.summary()


@pytest.mark.parametrize("broken", ["noise_divided_by_4", "clipping_skipped"])
def test_a_broken_mechanism_is_flagged(broken, request):
    request.getfixturevalue(broken)
    kw = dict(AUDIT, canary_norm=4.0) if broken == "clipping_skipped" else AUDIT
    rep = audit_engine(target_epsilon=1.0, steps=1, sample_rate=1.0, seed=0, **kw)
    assert rep.violated, rep.summary()


NORMALISATION = dict(runs=1000, delta=1e-5, beta=BETA)  # 1000 one-step releases: ~4 CPU s


@pytest.fixture
def realised_batch_size(monkeypatch):
    """The broken normalisation: the noisy sum divided by the realised batch size |B| (the samples
    whose norms the optimizer computed), not by the expected batch size it was given."""
    accumulate, release = DPOptimizer._accumulate_chunk, DPOptimizer._finalize_logical_batch

    def counting(self, samples):
        before = self.stats["samples"]
        try:
            return accumulate(self, samples)
        finally:
            self._realised = getattr(self, "_realised", 0) + self.stats["samples"] - before

    def by_realised(self):
        expected, self.expected_batch_size = self.expected_batch_size, max(1, getattr(self, "_realised", 0))
        self._realised = 0
        try:
            return release(self)
        finally:
            self.expected_batch_size = expected

    monkeypatch.setattr(DPOptimizer, "_accumulate_chunk", counting)
    monkeypatch.setattr(DPOptimizer, "_finalize_logical_batch", by_realised)


@pytest.mark.parametrize("eps,seed", [(1.0, 0), (4.0, 1)])
def test_the_normalisation_passes_its_audit(eps, seed):
    rep = audit_batch_normalisation(target_epsilon=eps, seed=seed, **NORMALISATION)
    assert rep.epsilon_claimed == pytest.approx(eps, rel=0.02)
    assert not rep.violated, rep.summary()
    if eps > 1:  # not a blind audit: the canary score sees the canary (measured 1.19 at seed 1)
        assert rep.epsilon_lower > 0.5, rep.summary()


def test_the_realised_batch_size_is_flagged(realised_batch_size):
    """|B| = others + S_t differs by one with the canary: the noise's scale gives it away (measured:
    3.72 at a claimed 1.0, from the batch-size score)."""
    rep = audit_batch_normalisation(target_epsilon=1.0, seed=0, **NORMALISATION)
    assert rep.violated and "batch size" in rep.note, rep.summary()


def test_cli_writes_report_and_plot(tmp_path):
    from dpfast.cli import main

    assert main(["audit", "--epsilon", "2", "--canaries", "2000", "--seed", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["violated"] is False and report["epsilon_lower"] <= report["epsilon_claimed"]
    assert (tmp_path / "audit_scores.png").stat().st_size > 1000
    assert main(["audit", "--epsilon", "2", "--sample-rate", "2"]) == 2
    assert main(["audit", "--epsilon", "1e-9", "--canaries", "200"]) == 2     # calibration refuses: rc 2, not 1
    assert main(["audit", "--epsilon", "2", "--seed", str(2**70)]) == 2
