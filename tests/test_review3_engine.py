"""Review 3 findings on the engine (/tmp/review3/REPORT.md, M1, M2, L1).

M1. The loader's sampling rate was a plain attribute it read for every batch, while the engine charged
    every release at the copy it took at make_private: setting ``loader.sample_rate = 0.5`` after
    make_private at q = 0.01 drew batches of half the data set and reported epsilon 0.59 for a true 25.9.
M2. A checkpoint resumed next to a ledger that does not record its run's releases (copied to a new
    directory, or a ledger restored from an older backup) re-released noise keys the original run had
    released after the checkpoint: the difference of the two releases cancelled the noise.
L1. Without a loader, epsilon assumes the caller feeds Poisson batches at the given rate: said at once.
"""
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpfast import PrivacyEngine
from dpfast.ledger import Ledger


def _run(ledger=None, seed=3, steps=2, n=64):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    data = TensorDataset(torch.randn(n, 4), torch.randn(n, 1))
    engine = PrivacyEngine(accountant="rdp", seed=seed, ledger=ledger)
    m, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.0,
                                         max_grad_norm=1.0)
    done = 0
    while done < steps:
        for x, y in loader:
            ((m(x) - y) ** 2).mean().backward()
            if opt.step():
                done += 1
            opt.zero_grad()
            if done >= steps:
                break
    return engine, m, opt, loader


def test_the_loaders_rate_cannot_be_changed_under_the_accountant():
    engine, _, _, loader = _run(steps=1)
    q = loader.sample_rate
    with pytest.raises(AttributeError, match="fixed at"):
        loader.sample_rate = 0.5
    with pytest.raises(ValueError, match="the loader's"):
        engine.sample_rate = 0.5
    assert loader.sample_rate == engine.sample_rate == q
    engine.sample_rate = q  # the same rate is no change


def test_every_release_is_charged_at_the_rate_its_batch_was_drawn_at():
    engine, m, opt, loader = _run(steps=3)
    assert {q for _, q, _ in engine.accountant.history} == {loader.sample_rate}
    assert sum(n for *_, n in engine.accountant.history) == 3
    assert engine.state_dict()["sample_rate"] == loader.sample_rate


def test_a_checkpoint_next_to_another_runs_ledger_is_refused(tmp_path):
    """r2_ledger_missing.py: the checkpoint is copied to a new directory with a fresh ledger."""
    engine, *_ = _run(ledger=tmp_path / "a.jsonl", steps=2)
    sd = engine.state_dict()
    fresh = PrivacyEngine(accountant="rdp", ledger=tmp_path / "b.jsonl")
    with pytest.raises(ValueError, match="not this checkpoint's run's.*no record of 2"):
        fresh.load_state_dict(sd)
    assert fresh.accountant.steps == 0  # refused before anything changed
    own = PrivacyEngine(accountant="rdp", ledger=tmp_path / "a.jsonl")
    own.load_state_dict(sd)  # next to its own ledger: resumes
    assert own.accountant.steps == 2


def test_a_ledger_restored_from_an_older_backup_is_refused(tmp_path):
    path = tmp_path / "ledger.jsonl"
    engine, *_ = _run(ledger=path, steps=3)
    sd = engine.state_dict()
    lines = path.read_text().splitlines(keepends=True)
    releases = [ln for ln in lines if '"key"' in ln]
    assert len(releases) == 3
    path.write_text("".join(lines[:lines.index(releases[1])]))  # the backup knew of the first release only
    with pytest.raises(ValueError, match="no record of 2 of them \\(first: step 1\\)"):
        PrivacyEngine(accountant="rdp", ledger=path).load_state_dict(sd)
    assert len(Ledger(path).entries()) >= 1


def test_without_a_loader_epsilon_names_its_poisson_assumption():
    model = nn.Linear(2, 1)
    with pytest.warns(UserWarning, match="assumes that every batch you feed is a Poisson sample"):
        PrivacyEngine(accountant="rdp", seed=0).make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
            max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.01, poisson_sampling=False)
    model = nn.Linear(2, 1)
    with warnings.catch_warnings():  # q = 1 charges every record in every step: nothing assumed
        warnings.simplefilter("error")
        PrivacyEngine(accountant="rdp", seed=0).make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
            max_grad_norm=1.0, expected_batch_size=4, sample_rate=1.0, poisson_sampling=False)
