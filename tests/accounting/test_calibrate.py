"""Noise calibration: certified (upper epsilon <= target), tight (within 1% of the sigma whose true
epsilon is the target), consistent with the accountants, and clear about impossible requests."""

import math

import numpy as np
import pytest

from dpfast.accounting import calibrate_noise_multiplier, compute_epsilon
from dpfast.accounting.calibrate import calibrate, steps_from_epochs
from dpfast.accounting.prv import prv_epsilon
from dpfast.accounting.rdp import rdp_epsilon

DPDM_Q = 4096 / 60000  # DPDM: batch 4096 of 60,000 images, 300 epochs, delta 1e-5


@pytest.mark.parametrize("target,q,steps", [
    (1.0, 0.01, 5000),
    (10.0, DPDM_Q, 4395),
    (0.5, 0.02, 300),
])
def test_prv_calibration_is_certified_and_tight(target, q, steps):
    result = calibrate(target, 1e-5, q, steps=steps)
    sigma = result.noise_multiplier
    assert result.report.accountant == "prv" and result.steps == steps
    # certified: the upper bound at sigma (as the search computed it, and as an accountant reports it)
    assert result.report.epsilon <= target
    assert compute_epsilon(sigma, q, steps, 1e-5) <= target
    # tight: with 1% less noise a finer accountant's *lower* bound exceeds the target, so the sigma whose
    # true epsilon is the target lies above sigma / 1.01
    lower, _, _, _ = prv_epsilon([(sigma / 1.01, q, steps)], 1e-5, eps_error=0.002 * target)
    assert lower > target
    # and RDP asks for more noise
    assert sigma < calibrate_noise_multiplier(target, 1e-5, q, steps=steps, accountant="rdp")


def test_rdp_calibration_is_the_smallest_certified_sigma():
    sigma = calibrate_noise_multiplier(2.0, 1e-5, 0.01, epochs=20, accountant="rdp")
    assert rdp_epsilon([(sigma, 0.01, 2000)], 1e-5)[0] <= 2.0
    assert rdp_epsilon([(sigma * (1 - 1e-4), 0.01, 2000)], 1e-5)[0] > 2.0


def test_epochs_mean_ceil_epochs_over_sample_rate():
    assert steps_from_epochs(300, DPDM_Q) == 4395  # 4394.53 -> 4395
    assert steps_from_epochs(300, 0.05) == 6000  # 300 / 0.05 = 6000.000000000001 in floating point
    assert steps_from_epochs(1, 0.3) == 4
    by_epochs = calibrate_noise_multiplier(4.0, 1e-5, np.float64(0.05), epochs=np.int64(10), accountant="rdp")
    assert by_epochs == calibrate_noise_multiplier(4.0, 1e-5, 0.05, steps=200, accountant="rdp")


def test_history_is_charged_to_the_target():
    warm_up = [(3.0, 0.01, 500)]
    plain = calibrate_noise_multiplier(3.0, 1e-5, 0.02, steps=1000)
    result = calibrate(3.0, 1e-5, 0.02, steps=1000, history=warm_up)
    assert result.noise_multiplier > plain
    assert result.report.history == (*warm_up, (result.noise_multiplier, 0.02, 1000))
    assert result.report.steps == 1500 and result.report.epsilon <= 3.0
    spent = rdp_epsilon(warm_up, 1e-5)[0]
    with pytest.raises(ValueError, match="cannot be reached"):
        calibrate_noise_multiplier(spent / 3, 1e-5, 0.02, steps=1000, history=warm_up, accountant="rdp")


def test_unreachable_and_meaningless_targets():
    with pytest.raises(ValueError, match="cannot be reached"):
        calibrate_noise_multiplier(1e-6, 1e-5, 1.0, steps=10)
    with pytest.raises(ValueError, match="no meaningful privacy"):
        calibrate_noise_multiplier(1e6, 1e-5, 0.001, steps=1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_epsilon=0.0), "target_epsilon"),
    (dict(target_epsilon=-1.0), "target_epsilon"),
    (dict(target_epsilon=math.inf), "target_epsilon"),
    (dict(delta=0.0), "delta"),
    (dict(delta=1.0), "delta"),
    (dict(sample_rate=0.0), "sample_rate"),
    (dict(sample_rate=1.5), "sample_rate"),
    (dict(steps=0), "steps"),
    (dict(steps=None), "exactly one"),
    (dict(epochs=3.0), "exactly one"),
    (dict(steps=None, epochs=-1.0), "epochs"),
    (dict(accountant="moments"), "accountant"),
    (dict(history=[(0.0, 0.1, 10)]), "noise_multiplier"),
])
def test_invalid_arguments(kwargs, match):
    args = dict(target_epsilon=1.0, delta=1e-5, sample_rate=0.01, steps=100, accountant="rdp")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        calibrate_noise_multiplier(**args)


def test_prv_failure_falls_back_to_rdp_with_a_warning(monkeypatch):
    import dpfast.accounting.calibrate as calibrate_module
    from dpfast.accounting.prv import PRVNumericalError

    def fail(*args, **kwargs):
        raise PRVNumericalError("simulated")

    monkeypatch.setattr(calibrate_module, "prv_epsilon", fail)
    with pytest.warns(RuntimeWarning, match="RDP calibration"):
        result = calibrate(2.0, 1e-5, 0.01, steps=1000)
    assert result.report.accountant == "rdp" and "simulated" in result.report.note
    assert result.noise_multiplier == calibrate_noise_multiplier(2.0, 1e-5, 0.01, steps=1000, accountant="rdp")
    assert result.report.epsilon <= 2.0
    d = result.to_dict()
    assert d["noise_multiplier"] == result.noise_multiplier and d["adjacency"] == "add/remove-one"
