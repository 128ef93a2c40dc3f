"""RDP of the Poisson-subsampled Gaussian: against TF-Privacy's formulas (as shipped in prv-accountant),
published values, and the structure of RDP (additivity, monotonicity, the q = 1 closed form)."""

import json
import math

import numpy as np
import pytest
from prv_accountant import PoissonSubsampledGaussianMechanism

from dpfast.accounting import Accountant, RDPAccountant, compute_epsilon
from dpfast.accounting.rdp import DEFAULT_ORDERS, rdp_epsilon, rdp_poisson_subsampled_gaussian, rdp_to_epsilon

ORDERS_CHECKED = (1.1, 1.5, 2.0, 2.5, 3.0, 4.75, 8.0, 10.9, 32.0, 63.0)


@pytest.mark.parametrize("sigma,q", [(0.6, 0.2), (1.1, 256 / 60000), (1.5, 0.04), (4.0, 0.01), (17.0, 0.0683)])
def test_matches_tf_privacy_formulas(sigma, q):
    # prv-accountant's rdp() is TF-Privacy's _compute_log_a (a float64 loop): an independent implementation.
    # It stops its fractional-order series at terms below e^-30 *absolute*; log(A) is ~1e-5 here, so it
    # is only good to ~3e-8 relative (ours is ~1e-10 from the quadrature below).
    reference = PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=sigma)
    ours = rdp_poisson_subsampled_gaussian(sigma, q, ORDERS_CHECKED)
    theirs = np.array([float(reference.rdp(a)) for a in ORDERS_CHECKED])
    np.testing.assert_allclose(ours, theirs, rtol=1e-7, atol=0)
    integer = [n for n, a in enumerate(ORDERS_CHECKED) if a.is_integer()]
    np.testing.assert_allclose(ours[integer], theirs[integer], rtol=1e-11, atol=0)


@pytest.mark.parametrize("sigma,q,alpha", [(1.1, 256 / 60000, 1.1), (1.5, 0.04, 4.75), (17.0, 0.0683, 10.9)])
def test_fractional_orders_match_quadrature(sigma, q, alpha):
    """A_alpha = E_{x ~ N(0, sigma^2)}[(1 - q + q exp((2x - 1) / (2 sigma^2)))^alpha], integrated to 30 digits."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(30):
        s, p, a = mpmath.mpf(sigma), mpmath.mpf(q), mpmath.mpf(alpha)
        def integrand(x):
            return mpmath.npdf(x, 0, s) * (1 - p + p * mpmath.exp((2 * x - 1) / (2 * s * s))) ** a

        log_a = mpmath.log(mpmath.quad(integrand, [-mpmath.inf, -10 * s, 0, 0.5, 1, 10 * s + 1, mpmath.inf]))
        expected = float(log_a / (a - 1))
    assert rdp_poisson_subsampled_gaussian(sigma, q, (alpha,))[0] == pytest.approx(expected, rel=1e-9)


def test_full_sampling_is_the_gaussian_closed_form():
    rdp = rdp_poisson_subsampled_gaussian(2.0, 1.0, (1.5, 2.0, 7.25))
    np.testing.assert_allclose(rdp, np.array([1.5, 2.0, 7.25]) / (2 * 2.0**2), rtol=1e-15)


def test_published_value():
    # sigma=1.5, q=0.04, 2250 steps, delta=1e-5: RDP (Balle et al. conversion) about 7.33.
    eps = compute_epsilon(1.5, 0.04, 2250, 1e-5, accountant="rdp")
    assert eps == pytest.approx(7.33, abs=0.01)


def test_conversion_is_the_improved_bound():
    alpha, rdp, delta = 4.0, 0.7, 1e-5
    eps, order = rdp_to_epsilon(np.array([rdp]), [alpha], delta)
    expected = rdp + math.log((alpha - 1) / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
    assert order == alpha and eps == pytest.approx(expected, rel=1e-14)
    # never below zero, whatever the orders say
    assert rdp_to_epsilon(np.array([1e-9]), [64.0], 0.5)[0] == 0.0


def test_composition_adds_and_is_monotone():
    one = rdp_poisson_subsampled_gaussian(1.2, 0.01)
    assert np.all(np.isfinite(one)) and np.all(one > 0) and len(one) == len(DEFAULT_ORDERS)
    split = rdp_epsilon([(1.2, 0.01, 300), (1.2, 0.01, 700)], 1e-5)[0]
    assert split == pytest.approx(rdp_epsilon([(1.2, 0.01, 1000)], 1e-5)[0], rel=1e-12)
    eps = [rdp_epsilon([(1.2, 0.01, n)], 1e-5)[0] for n in (10, 100, 1000)]
    assert eps[0] < eps[1] < eps[2]
    assert rdp_epsilon([(2.0, 0.01, 1000)], 1e-5)[0] < eps[2]  # more noise, less epsilon
    assert rdp_epsilon([(1.2, 0.02, 1000)], 1e-5)[0] > eps[2]  # larger sampling rate, more epsilon


def test_accountant_history_report_and_state():
    acc = Accountant.create("rdp")
    assert isinstance(acc, RDPAccountant) and acc.get_epsilon(1e-5) == 0.0
    acc.step(noise_multiplier=1.5, sample_rate=0.04, steps=1000)
    acc.step(noise_multiplier=1.5, sample_rate=0.04, steps=1250)
    assert acc.history == [(1.5, 0.04, 2250)] and acc.steps == 2250
    report = acc.report(1e-5)
    assert report.accountant == "rdp" and report.epsilon_lower == 0.0
    assert report.epsilon == report.epsilon_estimate == pytest.approx(7.3291, abs=1e-3)
    state = json.loads(json.dumps(acc.state_dict()))
    restored = Accountant.from_state_dict(state)
    assert isinstance(restored, RDPAccountant) and restored.get_epsilon(1e-5) == report.epsilon
    with pytest.raises(ValueError, match="orders"):
        RDPAccountant().load_state_dict({**state, "config": {"orders": [0.5, 2]}})
