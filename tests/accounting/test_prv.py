"""PRV accountant: published values, agreement with prv-accountant where it works, the cases where it
does not ("Discrete mean differs"), PRV <= RDP, phases, caching, state, and the Accountant API."""

import json
import math
import warnings

import numpy as np
import pytest
from prv_accountant import PoissonSubsampledGaussianMechanism
from prv_accountant import PRVAccountant as PackagePRVAccountant

import dpfast.accounting.prv as prv_module
from dpfast.accounting import ADJACENCY, Accountant, EpsilonReport, PRVAccountant, RDPAccountant, compute_epsilon
from dpfast.accounting.prv import Discretisation, PRVNumericalError, _cdf_scalar, _cdf_sf, prv_epsilon
from dpfast.accounting.rdp import rdp_epsilon


def package_epsilon(phases, delta, eps_error):
    """prv-accountant 0.2.0's own PRVAccountant (keyword arguments: its README has them in the wrong order)."""
    prvs = [PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=s) for s, q, _ in phases]
    counts = [n for _, _, n in phases]
    acc = PackagePRVAccountant(prvs=prvs, max_self_compositions=counts, eps_error=eps_error, delta_error=delta / 1000)
    return acc.compute_epsilon(delta=delta, num_self_compositions=counts)


# ---------------------------------------------------------------------------------------------
# Published values


def test_published_value_and_rdp():
    # sigma=1.5, q=0.04, 2250 steps, delta=1e-5: PRV about 6.78 (RDP about 7.33).
    acc = PRVAccountant()
    acc.step(noise_multiplier=1.5, sample_rate=0.04, steps=2250)
    report = acc.report(1e-5)
    assert report.accountant == "prv"
    assert report.epsilon_lower <= 6.78 <= report.epsilon
    assert report.epsilon_estimate == pytest.approx(6.77, abs=0.01)
    # eps_error is 0.5% of epsilon: the bounds are ~1% apart
    assert report.epsilon - report.epsilon_lower == pytest.approx(0.01 * report.epsilon_estimate, rel=0.1)
    assert report.epsilon < compute_epsilon(1.5, 0.04, 2250, 1e-5, accountant="rdp")


def test_fourier_accountant_published_value():
    # Koskela, Jalko, Honkela (AISTATS 2020), remove/add relation: sigma=4, q=0.01, 1e4 compositions
    # gives delta = 4.243484012034273e-06 at epsilon = 1.0.
    lower, estimate, upper, _ = prv_epsilon([(4.0, 0.01, 10_000)], 4.243484012034273e-06, eps_error=0.005)
    assert lower <= 1.0 <= upper
    assert estimate == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Agreement with prv-accountant, and its failure


@pytest.mark.parametrize("phases,delta", [
    ([(1.5, 0.04, 2250)], 1e-5),
    ([(0.8, 0.005, 1000)], 1e-6),
    ([(1.0, 1.0, 5)], 1e-5),
    ([(2.0, 0.01, 300), (1.0, 0.02, 200)], 1e-5),  # heterogeneous
])
def test_matches_prv_accountant_where_it_works(phases, delta):
    # Same discretisation (grid size aside: ours is FFT-friendly) and the same bound: agree closely.
    ours = prv_epsilon(phases, delta, eps_error=0.05)[:3]
    theirs = package_epsilon(phases, delta, eps_error=0.05)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)


@pytest.mark.parametrize("sigma,q,steps", [(0.8, 0.1, 30), (0.5, 0.5, 1000)])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # inside prv-accountant's cdf
def test_large_epsilon_where_prv_accountant_crashes(sigma, q, steps):
    # prv-accountant 0.2.0 computes the truncated mean with breakpoints fixed near 0 and refuses a
    # good discretisation (fixed upstream in PR #38, never released). epsilon ~ 8 and ~ 900 here.
    eps_error = 0.002 if sigma == 0.8 else 5.0
    with pytest.raises(RuntimeError, match="Discrete mean differs"):
        package_epsilon([(sigma, q, steps)], 1e-5, eps_error)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RDP fallback: the PRV bound itself
        lower, estimate, upper, _ = prv_epsilon([(sigma, q, steps)], 1e-5, eps_error)
    rdp = rdp_epsilon([(sigma, q, steps)], 1e-5)[0]
    assert 0 < lower <= estimate <= upper <= rdp
    assert 2 * eps_error <= upper - lower <= 3 * eps_error  # eps_error each side, plus delta_error's share


def test_fallback_to_rdp_with_a_warning(monkeypatch):
    def fail(*args, **kwargs):
        raise PRVNumericalError("simulated")

    monkeypatch.setattr(prv_module, "_discretise", fail)
    acc = PRVAccountant()
    acc.step(1.5, 0.04, 2250)
    with pytest.warns(RuntimeWarning, match="falling back to RDP"):
        report = acc.report(1e-5)
    assert report.accountant == "rdp" and "simulated" in report.note and report.adjacency == ADJACENCY
    assert report.epsilon == pytest.approx(rdp_epsilon([(1.5, 0.04, 2250)], 1e-5)[0], rel=1e-12)


def test_absurd_epsilon_does_not_crash():
    acc = PRVAccountant()
    acc.step(0.1, 0.5, 20_000)
    with pytest.warns(RuntimeWarning, match="RDP"):
        eps = acc.get_epsilon(1e-5)
    assert math.isfinite(eps) and eps > 1e4


def test_cdf_matches_prv_accountant():
    for sigma, q in [(0.8, 0.1), (1.5, 0.04), (17.0, 0.0683), (1.0, 1.0)]:
        t = np.linspace(-3, 8, 2001, dtype=np.longdouble)
        reference = PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=sigma).cdf(t)
        cdf, sf = _cdf_sf(t, sigma, q)
        np.testing.assert_allclose(cdf.astype(float), reference.astype(float), rtol=0, atol=5e-16)
        np.testing.assert_allclose((cdf + sf).astype(float), 1.0, rtol=0, atol=5e-16)
        scalar = np.array([_cdf_scalar(float(x), sigma, q) for x in t[::50]])
        np.testing.assert_allclose(scalar, reference[::50].astype(float), rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# Bounds and composition


@pytest.mark.parametrize("phases", [
    [(1.1, 256 / 60000, 14_063)],
    [(17.0, 4096 / 60000, 4395)],
    [(3.0, 0.02, 100), (1.2, 0.02, 2000), (2.0, 0.05, 500)],
])
def test_prv_is_below_rdp(phases):
    report = Accountant.create("prv")
    for phase in phases:
        report.step(*phase)
    prv = report.report(1e-5)
    assert prv.accountant == "prv"
    assert 0 <= prv.epsilon_lower <= prv.epsilon_estimate <= prv.epsilon < rdp_epsilon(phases, 1e-5)[0]


def test_phases_compose_in_any_order_and_merge():
    a, b = (2.0, 0.01, 300), (1.0, 0.02, 200)
    ab = prv_epsilon([a, b], 1e-5, 0.01)
    ba = prv_epsilon([b, a], 1e-5, 0.01)
    split = prv_epsilon([(2.0, 0.01, 100), b, (2.0, 0.01, 200)], 1e-5, 0.01)
    np.testing.assert_allclose(ab, ba, rtol=1e-12)
    np.testing.assert_allclose(ab, split, rtol=1e-12)
    assert ab[1] > max(prv_epsilon([a], 1e-5, 0.01)[1], prv_epsilon([b], 1e-5, 0.01)[1])


def test_lower_bound_is_clamped_at_zero():
    acc = PRVAccountant()
    acc.step(50.0, 0.001, 10)
    report = acc.report(1e-5)
    assert report.epsilon_lower == 0.0 <= report.epsilon_estimate <= report.epsilon < 1e-3


def test_eps_error_scales_with_epsilon():
    acc = PRVAccountant()
    acc.step(17.0, 4096 / 60000, 4395)  # epsilon ~ 1
    report = acc.report(1e-5)
    width = report.epsilon - report.epsilon_lower
    assert 0.005 * report.epsilon <= width <= 0.011 * report.epsilon


# ---------------------------------------------------------------------------------------------
# Caching: build once, query per epoch


def test_discretisation_is_reused_while_the_history_grows(monkeypatch):
    builds = []
    original = Discretisation.build.__func__

    def counting_build(cls, capacity, *args, **kwargs):
        builds.append(dict(capacity))
        return original(cls, capacity, *args, **kwargs)

    monkeypatch.setattr(Discretisation, "build", classmethod(counting_build))
    acc = PRVAccountant()
    q, per_epoch = 4096 / 60000, 15
    epsilons = []
    for epoch in range(6):
        for _ in range(per_epoch):
            acc.step(17.0, q)  # O(1): no discretisation
        epsilons.append(acc.get_epsilon(1e-5))
        assert acc.get_epsilon(1e-5) == epsilons[-1]  # unchanged history: cached
    assert all(x < y for x, y in zip(epsilons, epsilons[1:]))
    fine = [b for b in builds if sum(b.values()) >= per_epoch]
    # first query: coarse + exact build; later ones rebuild only when the history outgrows capacity
    # (15 -> 60 -> 150 steps), each with a coarse pass to size eps_error
    assert [sum(b.values()) for b in fine] == [15, 15, 30, 60, 75, 150]
    # the same numbers as a fresh accountant (to within the eps_error they were computed at)
    fresh = PRVAccountant()
    fresh.step(17.0, q, 6 * per_epoch)
    assert epsilons[-1] == pytest.approx(fresh.get_epsilon(1e-5), rel=0.01)


# ---------------------------------------------------------------------------------------------
# The Accountant API


def test_history_steps_and_validation():
    acc = Accountant.create("prv")
    assert isinstance(acc, PRVAccountant) and acc.get_epsilon(1e-5) == 0.0 and acc.steps == 0
    acc.step(noise_multiplier=1.0, sample_rate=0.01)  # warm-up
    acc.step(noise_multiplier=1.0, sample_rate=0.01, steps=9)
    acc.step(noise_multiplier=1.2, sample_rate=0.02, steps=5)
    acc.step(noise_multiplier=np.float64(1.2), sample_rate=0.02, steps=np.int64(5))
    assert acc.history == [(1.0, 0.01, 10), (1.2, 0.02, 10)] and acc.steps == 20
    for bad in [dict(noise_multiplier=0.0, sample_rate=0.1), dict(noise_multiplier=-1.0, sample_rate=0.1),
                dict(noise_multiplier=float("nan"), sample_rate=0.1), dict(noise_multiplier=1.0, sample_rate=0.0),
                dict(noise_multiplier=1.0, sample_rate=1.5), dict(noise_multiplier=1.0, sample_rate=0.1, steps=0),
                dict(noise_multiplier=1.0, sample_rate=0.1, steps=2.5), dict(noise_multiplier="1", sample_rate=0.1)]:
        with pytest.raises(ValueError):
            acc.step(**bad)
    for delta in (0.0, 1.0, -1e-5, float("nan")):
        with pytest.raises(ValueError, match="delta"):
            acc.get_epsilon(delta)
    with pytest.raises(ValueError, match="unknown accountant"):
        Accountant.create("moments")
    with pytest.raises(ValueError, match="central-limit approximation"):
        Accountant.create("gdp")
    assert acc.history == [(1.0, 0.01, 10), (1.2, 0.02, 10)]  # refused steps left no trace


def test_report_states_adjacency():
    acc = PRVAccountant()
    acc.step(1.5, 0.04, 2250)
    report = acc.report(1e-5)
    assert isinstance(report, EpsilonReport) and report.adjacency == "add/remove-one"
    assert "add/remove-one" in str(report) and "prv" in str(report) and "1e-05" in str(report)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["epsilon"] == report.epsilon and d["adjacency"] == "add/remove-one"
    assert d["history"] == [[1.5, 0.04, 2250]] and d["steps"] == 2250 and d["accountant"] == "prv"


def test_state_dict_round_trip_and_refusals():
    acc = PRVAccountant(eps_error_rel=0.01)
    acc.step(1.0, 0.01, 100)
    acc.step(2.0, 0.02, 50)
    state = json.loads(json.dumps(acc.state_dict()))
    restored = Accountant.from_state_dict(state)
    assert isinstance(restored, PRVAccountant) and restored.eps_error_rel == 0.01
    assert restored.history == acc.history and restored.steps == 150
    assert restored.get_epsilon(1e-5) == acc.get_epsilon(1e-5)
    restored.step(2.0, 0.02, 1)  # continues the last phase
    assert restored.history[-1] == (2.0, 0.02, 51)

    bad_states = [
        {**state, "kind": "rdp"},
        {**state, "version": 99},
        {**state, "adjacency": "replace-one"},
        {**state, "history": [[1.0, 0.01]]},
        {**state, "history": [[1.0, 2.0, 10]]},
        {**state, "history": [[1.0, 0.01, -3]]},
        {**state, "history": "1.0,0.01,100"},
        {**state, "config": {"eps_error_rel": 2.0}},
        {**state, "config": {"eps_max": 10.0}},
        {**state, "extra": 1},
        [1, 2, 3],
    ]
    for bad in bad_states:
        target = PRVAccountant()
        target.step(3.0, 0.5, 7)
        with pytest.raises(ValueError):
            target.load_state_dict(bad)
        assert target.history == [(3.0, 0.5, 7)]  # a refused state changes nothing
    with pytest.raises(ValueError, match="rdp"):
        RDPAccountant().load_state_dict(state)
