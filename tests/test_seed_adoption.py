"""A checkpoint loaded after make_private (accelerate's ``load_state`` after ``prepare``, the diffusers
order) into an engine whose seed was drawn from the OS: adopted while that seed has keyed nothing, so
the run goes on exactly as the uninterrupted one; refused, leaving the engine as it was, as soon as
the drawn seed was used (a release, a drawn batch, a composed engine) or chosen."""
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpfast import PrivacyEngine
from dpfast.errors import DPError
from dpfast.optimizer import DPOptimizer

DATA = TensorDataset(torch.randn(120, 4), torch.randint(0, 3, (120,)))


def build(engine, data=DATA):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    m, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=DataLoader(data, batch_size=24), noise_multiplier=1.0,
                                         max_grad_norm=1.0, max_physical_batch_size=16)
    return m, opt, loader


def run(m, opt, loader, n):
    done = 0
    while done < n:
        for x, y in loader:
            opt.zero_grad()
            if len(x):
                nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            # accelerate's AcceleratedOptimizer.step returns None: read the DPOptimizer's took_step
            if (opt if isinstance(opt, DPOptimizer) else opt.optimizer).took_step:
                done += 1
                if done == n:
                    return


def params(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def checkpoint(n=3, ledger=None):
    engine = PrivacyEngine(accountant="rdp", ledger=ledger)  # OS-drawn seed, as by default
    m, opt, loader = build(engine)
    run(m, opt, loader, n)
    return engine, (m, opt, loader), {"engine": engine.state_dict(), "model": m.state_dict(),
                                      "opt": opt.state_dict()}


def resume_after_make_private(ck, ledger=None, deterministic=False):
    engine = PrivacyEngine(accountant="rdp", ledger=ledger, deterministic_resume=deterministic)
    m, opt, loader = build(engine)
    m.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "without a privacy ledger"
        engine.load_state_dict(ck["engine"])
    return engine, (m, opt, loader)


@pytest.mark.parametrize("deterministic", [True, False])
def test_adopted_checkpoint_continues_the_uninterrupted_run(deterministic):
    """With deterministic_resume, exactly the uninterrupted run; by default the same accounting with a
    fresh noise and Poisson key (PrivacyEngine._resume_key)."""
    first, live, ck = checkpoint()
    engine, (m, opt, loader) = resume_after_make_private(ck, deterministic=deterministic)
    assert engine.seed == first.seed and engine.steps == 3
    assert (engine.key_seed == first.key_seed) is deterministic
    assert engine.optimizer.seed == engine.loader.seed == engine.key_seed
    assert engine.get_epsilon(1e-5) == pytest.approx(first.get_epsilon(1e-5))
    run(m, opt, loader, 2)
    run(*live, 2)
    assert torch.equal(params(m), params(live[0])) is deterministic
    assert engine.get_epsilon(1e-5) == pytest.approx(first.get_epsilon(1e-5))


def test_adoption_with_a_ledger_charges_releases_after_the_checkpoint(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    first, live, ck = checkpoint(ledger=ledger)
    run(*live, 2)  # released after the checkpoint: a resume from it must still be charged for them
    engine = PrivacyEngine(accountant="rdp", ledger=ledger)
    m, opt, loader = build(engine)  # a used ledger: no refusal yet, the checkpoint may still come
    with pytest.warns(UserWarning, match="2 steps released after this checkpoint"):
        engine.load_state_dict(ck["engine"])
    assert engine.steps == 5 and engine.get_epsilon(1e-5) == pytest.approx(first.get_epsilon(1e-5))
    run(m, opt, loader, 1)
    assert engine.steps == 6


def test_used_ledger_without_its_checkpoint_is_refused_at_the_first_step(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    checkpoint(ledger=ledger)
    engine = PrivacyEngine(accountant="rdp", ledger=ledger)
    m, opt, loader = build(engine)
    with pytest.raises(DPError, match="already records 3 releases of another run"):
        run(m, opt, loader, 1)
    assert engine.steps == 0 and engine.get_epsilon(1e-5) == 0 and engine.why_no_privacy is None


def _unchanged(engine, seed):
    assert engine.seed == seed and engine.optimizer.seed == seed and engine.loader.seed == seed
    assert engine.steps == 0 and engine.accountant.steps == 0


def test_a_used_or_chosen_seed_is_never_replaced():
    _, _, ck = checkpoint()
    # a release with the drawn seed
    engine = PrivacyEngine(accountant="rdp")
    m, opt, loader = build(engine)
    run(m, opt, loader, 1)
    with pytest.raises(ValueError, match="already released 1 steps"):
        engine.load_state_dict(ck["engine"])
    # a chunk of a Poisson batch drawn with it, not yet released
    engine = PrivacyEngine(accountant="rdp")
    m, opt, loader = build(engine)
    next(iter(loader))
    with pytest.raises(ValueError, match="already drew a batch"):
        engine.load_state_dict(ck["engine"])
    _unchanged(engine, engine.seed)
    # a seed the user chose
    engine = PrivacyEngine(accountant="rdp", seed=3)
    build(engine)
    with pytest.raises(ValueError, match="seed was chosen"):
        engine.load_state_dict(ck["engine"])
    _unchanged(engine, 3)
    # an engine composed after an earlier one
    earlier, _, _ = checkpoint(n=1)
    engine = PrivacyEngine(accountant="rdp")
    engine.compose_after(earlier)
    build(engine)
    with pytest.raises(ValueError, match="compose_after"):
        engine.load_state_dict(ck["engine"])


def test_a_refused_load_leaves_the_drawn_seed_in_place():
    """The sampler state does not fit this loader (another data set size): refused before the seed,
    the accountant or the position change."""
    _, _, ck = checkpoint()
    engine = PrivacyEngine(accountant="rdp")
    build(engine, data=TensorDataset(torch.randn(100, 4), torch.randint(0, 3, (100,))))
    seed = engine.seed
    with pytest.raises(ValueError, match="sampler state is for"):
        engine.load_state_dict(ck["engine"])
    _unchanged(engine, seed)
    assert engine.get_epsilon(1e-5) == 0 and not math.isinf(engine.get_epsilon(1e-5))


def test_accelerate_register_for_checkpointing_resumes_after_prepare(tmp_path):
    """The issue's case: the engine registered with accelerate, the default OS seed, and load_state
    after make_private and prepare (the diffusers order). It used to fail with "another seed"."""
    accelerate = pytest.importorskip("accelerate")

    def session(n, resume=None):
        acc = accelerate.Accelerator(cpu=True, project_dir=str(tmp_path))
        engine = PrivacyEngine(accountant="rdp", deterministic_resume=True)  # compared with the run below
        m, opt, loader = build(engine)
        m, opt = acc.prepare(m, opt)
        acc.register_for_checkpointing(engine)
        if resume:
            acc.load_state(str(resume))
        run(m, opt, loader, n)
        return acc, engine, m

    acc, first, m = session(3)
    acc.save_state(str(tmp_path / "ck"))
    eps3 = first.get_epsilon(1e-5)
    _, engine, m2 = session(2, resume=tmp_path / "ck")
    assert engine.seed == first.seed and engine.steps == 5
    assert engine.get_epsilon(1e-5) > eps3
    run(m, first.optimizer, first.loader, 2)  # the uninterrupted run
    assert torch.equal(params(m2), params(m))
    assert engine.get_epsilon(1e-5) == pytest.approx(first.get_epsilon(1e-5))


def test_a_batch_drawn_before_the_load_is_never_released_after_it():
    """Same seed (nothing to adopt): a chunk drawn and backpropagated before the load would be released
    with the checkpoint's next noise key but its own batch, one the checkpointed run released."""
    first, _, ck = checkpoint()
    engine = PrivacyEngine(accountant="rdp", seed=first.seed)
    m, opt, loader = build(engine)
    x, y = next(iter(loader))
    nn.functional.cross_entropy(m(x), y).backward()
    with pytest.raises(ValueError, match="waiting for optimizer.step"):
        engine.load_state_dict(ck["engine"])
    assert engine.steps == 0 and engine.accountant.steps == 0


def test_a_checkpoint_without_the_composed_engines_is_refused():
    earlier, _, _ = checkpoint(n=2)
    _, _, ck = checkpoint()  # a run that was not composed after `earlier`
    engine = PrivacyEngine(accountant="rdp")
    engine.compose_after(earlier)
    eps = engine.get_epsilon(1e-5)
    with pytest.raises(ValueError, match="composes after 1 earlier engine"):
        engine.load_state_dict(ck["engine"])
    assert engine.get_epsilon(1e-5) == eps and engine.prior_steps == 2


def test_a_calibrated_engine_refuses_a_later_checkpoint():
    _, _, ck = checkpoint()
    engine = PrivacyEngine(accountant="rdp")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    engine.make_private_with_epsilon(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=DataLoader(DATA, batch_size=24), target_epsilon=8.0,
                                     target_delta=1e-5, steps=20, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="calibrated by make_private_with_epsilon"):
        engine.load_state_dict(ck["engine"])


def test_a_lost_guarantee_survives_the_accountant_state_and_its_report():
    from dpfast.accounting import Accountant

    first, _, ck = checkpoint()
    first._lose_privacy("test")
    assert math.isinf(first.accountant.report(1e-5).epsilon)
    again = Accountant.create("rdp")
    again.load_state_dict(first.accountant.state_dict())
    assert math.isinf(again.get_epsilon(1e-5)) and math.isinf(again.report(1e-5).epsilon)


def test_a_failed_make_private_after_a_load_leaves_nothing_half_built():
    _, _, ck = checkpoint()
    engine = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine.load_state_dict(ck["engine"])
    with pytest.raises(ValueError, match="sampler state is for"):
        build(engine, data=TensorDataset(torch.randn(100, 4), torch.randint(0, 3, (100,))))
    assert engine.optimizer is None and engine.loader is None
    m, opt, loader = build(engine)  # the right data: the run resumes
    assert engine.steps == 3
