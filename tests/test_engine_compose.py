"""Several models trained one after the other on the same private data (DP-SAD's teacher, then its
student): PrivacyEngine.compose_after charges the later engine with the earlier one's releases, and
refuses what would make the composition false (shared seeds, a late call)."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpfast import PrivacyEngine
from dpfast.accounting import epsilon_report
from dpfast.errors import DPError

DATA = TensorDataset(torch.randn(200, 3), torch.randn(200, 1))


def train(engine, steps, sigma=1.0, batch=20, **kw):
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if sigma is None:
        m, o, loader = engine.make_private_with_epsilon(module=model, optimizer=opt, data_loader=DataLoader(DATA, batch_size=batch),
                                                        max_grad_norm=1.0, steps=steps, **kw)
    else:
        m, o, loader = engine.make_private(module=model, optimizer=opt, data_loader=DataLoader(DATA, batch_size=batch),
                                           noise_multiplier=sigma, max_grad_norm=1.0)
    while o.steps < steps:
        for x, y in loader:
            o.zero_grad()
            if len(x):
                (m(x) - y).square().flatten(1).mean(1).mean().backward()
            o.step()
            if o.steps >= steps:
                break
    return engine


def test_epsilon_is_one_accountant_over_both_histories():
    teacher = train(PrivacyEngine(accountant="rdp", seed=1), 7, sigma=1.2, batch=20)
    student = PrivacyEngine(accountant="rdp", seed=2)
    student.compose_after(teacher)
    train(student, 5, sigma=0.9, batch=40)
    expected = epsilon_report([(1.2, 0.1, 7), (0.9, 0.2, 5)], 1e-5, "rdp").epsilon
    assert student.get_epsilon(1e-5) == pytest.approx(expected, rel=1e-12)
    assert student.get_epsilon(1e-5) > teacher.get_epsilon(1e-5)
    assert student.prior_steps == 7 and student.steps == 5
    # a checkpoint keeps the composition (a resumed student forgets nothing)
    again = PrivacyEngine(accountant="rdp", seed=2)
    again.load_state_dict(student.state_dict())
    assert again.get_epsilon(1e-5) == pytest.approx(expected, rel=1e-12)
    assert again.prior_runs == student.prior_runs and again.prior_steps == 7


def test_the_later_engine_is_calibrated_for_what_the_earlier_one_left():
    teacher = train(PrivacyEngine(accountant="rdp", seed=1), 10, sigma=1.5)
    student = PrivacyEngine(accountant="rdp", seed=2)
    student.compose_after(teacher.state_dict())  # a state_dict works as well (a teacher from a checkpoint)
    train(student, 10, sigma=None, target_epsilon=4.0, target_delta=1e-5)
    assert 0.9 * 4.0 < student.get_epsilon(1e-5) <= 4.0
    alone = epsilon_report([(student.noise_multiplier, 0.1, 10)], 1e-5, "rdp").epsilon
    assert alone < student.get_epsilon(1e-5)  # the student alone would have been given less noise


def test_a_shared_seed_is_refused():
    """Two engines with one seed draw the same noise keys and Poisson batches: the difference of two
    releases would cancel the noise, and the batches would not be independent."""
    teacher = train(PrivacyEngine(accountant="rdp", seed=5), 3)
    with pytest.raises(DPError, match="same seed"):
        PrivacyEngine(accountant="rdp", seed=5).compose_after(teacher)
    # also through a chain: a third engine may not reuse the first one's seed
    student = PrivacyEngine(accountant="rdp", seed=6)
    student.compose_after(teacher)
    train(student, 2)
    with pytest.raises(DPError, match="same seed"):
        PrivacyEngine(accountant="rdp", seed=5).compose_after(student)
    third = PrivacyEngine(accountant="rdp", seed=7)
    third.compose_after(student)
    assert [p["steps"] for p in third.prior_runs] == [3, 2] and third.prior_steps == 5


def test_composition_after_a_release_is_refused():
    teacher = train(PrivacyEngine(accountant="rdp", seed=1), 2)
    student = train(PrivacyEngine(accountant="rdp", seed=2), 1)
    with pytest.raises(DPError, match="before this engine's first release"):
        student.compose_after(teacher)
    with pytest.raises(ValueError, match="PrivacyEngine or its state_dict"):
        PrivacyEngine(seed=3).compose_after({"seed": 1})


def test_a_lost_guarantee_is_inherited():
    with pytest.warns(UserWarning, match="NOT differentially private"):
        teacher = train(PrivacyEngine(accountant="rdp", seed=1), 2, sigma=0.0)
    assert teacher.get_epsilon(1e-5) == math.inf
    student = PrivacyEngine(accountant="rdp", seed=2)
    student.compose_after(teacher)
    train(student, 2)
    assert student.get_epsilon(1e-5) == math.inf and "earlier engine" in student.why_no_privacy
