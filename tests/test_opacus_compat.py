"""Opacus code after the import swap: the keywords, accountant methods, engine methods and
BatchMemoryManager Opacus scripts use are honoured, or refused with an error naming the dpfast way,
before anything is released."""
import os
import stat

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpfast import PrivacyEngine
from dpfast.errors import DPError, UnsupportedModuleError

DATA = TensorDataset(torch.randn(120, 4), torch.randint(0, 3, (120,)))


def setup(engine=None, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = engine or PrivacyEngine(accountant="rdp", seed=11)
    out = engine.make_private(module=model, optimizer=opt, data_loader=DataLoader(DATA, batch_size=24),
                              noise_multiplier=1.0, max_grad_norm=1.0, **kw)
    return engine, model, out


def steps(model, opt, loader, n, criterion=None):
    criterion = criterion or nn.CrossEntropyLoss()
    done = 0
    while done < n:
        for x, y in loader:
            opt.zero_grad()
            if len(x):
                criterion(model(x), y).backward()
            if opt.step():
                done += 1
                if done == n:
                    break


def test_opacus_keywords_that_dpfast_honours_are_accepted():
    engine, model, (m, opt, loader) = setup(batch_first=True, clipping="flat", grad_sample_mode="hooks",
                                            wrap_model=False, criterion=nn.CrossEntropyLoss(), rand_on_empty=False,
                                            secure_mode=False, noise_generator=None)
    steps(m, opt, loader, 2)
    assert engine.get_epsilon(1e-5) > 0


def test_ghost_mode_returns_opacus_four_tuple():
    criterion = nn.CrossEntropyLoss()
    engine, model, out = setup(grad_sample_mode="ghost", criterion=criterion)
    from dpfast.engine import RowReducedLoss

    assert len(out) == 4 and isinstance(out[2], RowReducedLoss) and out[2].loss.reduction == "none"
    m, opt, crit, loader = out
    steps(m, opt, loader, 2, crit)
    assert opt.steps == 2


@pytest.mark.parametrize("kw, match", [
    (dict(clipping="per_layer"), "clips flat"),
    (dict(clipping="adaptive"), "clips flat"),
    (dict(max_grad_norm=[1.0, 1.0]), "per-layer clipping"),
    (dict(batch_first=False), "batch first"),
    (dict(noise_generator=torch.Generator()), "PrivacyEngine\\(seed=...\\)"),
    (dict(rand_on_empty=True), "len\\(x\\) == 0"),
    (dict(secure_mode=True), "PrivacyEngine\\(secure_mode=True\\)"),
    (dict(criterion=nn.CrossEntropyLoss(reduction="sum")), "reduction"),
])
def test_opacus_keywords_dpfast_cannot_honour_are_refused_before_anything_is_released(kw, match):
    engine = PrivacyEngine(accountant="rdp", seed=11)
    model = nn.Linear(4, 3)
    args = dict(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                data_loader=DataLoader(DATA, batch_size=24), noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(DPError, match=match):
        engine.make_private(**dict(args, **kw))
    assert engine.optimizer is None and engine.get_epsilon(1e-5) == 0.0
    with pytest.raises(ValueError, match="grad_sample_mode must be one of"):
        engine.make_private(**dict(args, grad_sample_mode="bogus"))


def test_make_private_with_epsilon_takes_epsilon_tolerance():
    engine = PrivacyEngine(accountant="rdp", seed=1)
    model = nn.Linear(4, 3)
    m, opt, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(DATA, batch_size=24),
        target_epsilon=3.0, target_delta=1e-5, epochs=2, max_grad_norm=1.0, epsilon_tolerance=0.01)
    steps(m, opt, loader, 10)
    assert 0.9 * 3.0 < engine.get_epsilon(1e-5) <= 3.0


def test_accountant_methods_opacus_scripts_call():
    engine, model, (m, opt, loader) = setup()
    steps(m, opt, loader, 3)
    acc = engine.accountant
    assert acc.mechanism() == "rdp" and len(acc) == 1
    eps, alpha = acc.get_privacy_spent(delta=1e-5)
    assert eps == pytest.approx(engine.get_epsilon(1e-5)) and alpha > 1
    with pytest.raises(ValueError, match="central-limit"):
        PrivacyEngine(accountant="gdp")


def test_module_checks_under_opacus_names():
    bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    assert not PrivacyEngine.is_compatible(module=bn)
    with pytest.raises(UnsupportedModuleError):
        PrivacyEngine.validate(module=bn, optimizer=None, data_loader=None)
    fixed = PrivacyEngine.get_compatible_module(bn)
    assert PrivacyEngine.is_compatible(module=fixed) and isinstance(fixed[1], nn.GroupNorm)


def test_save_and_load_checkpoint_continue_the_run(tmp_path):
    engine, model, (m, opt, loader) = setup()
    steps(m, opt, loader, 3)
    path = tmp_path / "ckpt.pt"
    engine.save_checkpoint(path=path, module=m, optimizer=opt, checkpoint_dict={"epoch": 1})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # it holds the noise seed
    eps3 = engine.get_epsilon(1e-5)
    # a new process: the model, optimizer and engine come back before make_private
    torch.manual_seed(5)
    model2 = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    engine2 = PrivacyEngine(accountant="rdp", deterministic_resume=True)  # compared with the run below
    with pytest.warns(UserWarning, match="without a privacy ledger"):
        ckpt = engine2.load_checkpoint(path=path, module=model2, optimizer=opt2)
    assert ckpt["epoch"] == 1 and engine2.seed == engine.seed
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    m2, o2, l2 = engine2.make_private(module=model2, optimizer=opt2, data_loader=DataLoader(DATA, batch_size=24),
                                      noise_multiplier=1.0, max_grad_norm=1.0)
    assert engine2.get_epsilon(1e-5) == pytest.approx(eps3)
    steps(m2, o2, l2, 2)
    steps(m, opt, loader, 2)  # the uninterrupted run
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    # an engine that already released with its own seed refuses another run's checkpoint
    engine3, _, (m3, o3, l3) = setup(PrivacyEngine(accountant="rdp"))
    steps(m3, o3, l3, 1)
    with pytest.raises(ValueError, match="another seed and this engine already released 1 steps"):
        engine3.load_checkpoint(path=path, module=m3, optimizer=o3)
    with pytest.raises(DPError, match="schedulers"):
        engine.save_checkpoint(path=tmp_path / "x.pt", module=m, noise_scheduler=object())


def test_batch_memory_manager_gives_the_same_run_as_max_physical_batch_size():
    from dpfast.utils.batch_memory_manager import BatchMemoryManager

    def run(use_bmm):
        engine, model, (m, opt, loader) = setup(**({} if use_bmm else {"max_physical_batch_size": 5}))
        sizes, logical = [], 0
        if use_bmm:
            with BatchMemoryManager(data_loader=loader, max_physical_batch_size=5, optimizer=opt) as chunks:
                for x, y in chunks:
                    opt.zero_grad()
                    sizes.append(len(x))
                    if len(x):
                        nn.functional.cross_entropy(m(x), y).backward()
                    logical += bool(opt.step())
            assert loader.max_physical_batch_size is None  # restored after the block
        else:
            for x, y in loader:
                opt.zero_grad()
                sizes.append(len(x))
                if len(x):
                    nn.functional.cross_entropy(m(x), y).backward()
                logical += bool(opt.step())
        return [p.detach().clone() for p in model.parameters()], sizes, logical

    a, sizes_a, la = run(True)
    b, sizes_b, lb = run(False)
    assert max(sizes_a) <= 5 and sizes_a == sizes_b and la == lb == 5
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    with pytest.raises(DPError, match="make_private returned"):
        BatchMemoryManager(data_loader=DataLoader(DATA, batch_size=4), max_physical_batch_size=2)


def test_grad_scaler_is_refused_with_the_bf16_answer():
    """torch.amp.GradScaler used to fail inside torch with "No inf checks were recorded"; now the step is
    refused with what to do instead, and nothing is released."""
    import warnings

    engine, model, (m, opt, loader) = setup()
    scaler = torch.amp.GradScaler("cpu")
    x, y = next(iter(loader))
    scaler.scale(nn.functional.cross_entropy(m(x), y)).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch announces the grad_scaler= contract's future
        with pytest.raises(DPError, match="bfloat16"):
            scaler.step(opt)
    assert opt.steps == 0 and engine.get_epsilon(1e-5) == 0.0


def test_an_optimizer_state_restored_without_the_engines_is_refused():
    """accelerate's load_state without the engine registered used to restart epsilon at 0 while the
    model and optimizer carried the earlier steps (0.334 reported instead of 0.403 after 30 steps)."""
    def adam_run(engine):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        return engine.make_private(module=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                                   data_loader=DataLoader(DATA, batch_size=24), noise_multiplier=1.0, max_grad_norm=1.0)

    engine = PrivacyEngine(accountant="rdp", seed=1)
    m, opt, loader = adam_run(engine)
    steps(m, opt, loader, 3)
    saved, engine_state = opt.state_dict(), engine.state_dict()
    m2, opt2, loader2 = adam_run(PrivacyEngine(accountant="rdp"))
    opt2.load_state_dict(saved)
    x, y = next(iter(loader2))
    nn.functional.cross_entropy(m2(x), y).backward()
    with pytest.raises(DPError, match="restore the engine's state too"):
        opt2.step()                                   # refused before the first release
    assert opt2.steps == 0
    m2, opt2, loader2 = adam_run(PrivacyEngine(accountant="rdp"))
    opt2.load_state_dict(torch.optim.Adam(m2.parameters()).state_dict())  # an untrained state is fine
    steps(m2, opt2, loader2, 1)
    # the optimizer first, then the engine (accelerate's order with the engine registered): accepted
    engine4 = PrivacyEngine(accountant="rdp", seed=1)
    m4, opt4, loader4 = adam_run(engine4)
    opt4.load_state_dict(saved)
    with pytest.warns(UserWarning, match="without a privacy ledger"):
        engine4.load_state_dict(engine_state)
    steps(m4, opt4, loader4, 1)
    assert engine4.steps == 4
    # the engine restored first (before make_private), then the optimizer: accepted
    engine3 = PrivacyEngine(accountant="rdp")
    with pytest.warns(UserWarning, match="without a privacy ledger"):
        engine3.load_state_dict(engine_state)
    m3, opt3, _ = adam_run(engine3)
    opt3.load_state_dict(saved)
    assert engine3.steps == 3


# ----------------------------------------------------------------------------- review findings
def test_the_accountant_reports_infinity_once_the_guarantee_is_lost():
    """Opacus scripts read engine.accountant.get_epsilon: it must agree with engine.get_epsilon."""
    engine, model, (m, opt, loader) = setup()
    steps(m, opt, loader, 2)
    assert engine.accountant.get_epsilon(1e-5) == engine.get_epsilon(1e-5) < float("inf")
    opt.noise_multiplier = 0.0
    steps(m, opt, loader, 1)
    assert engine.get_epsilon(1e-5) == float("inf")
    assert engine.accountant.get_epsilon(1e-5) == float("inf")
    assert engine.accountant.get_privacy_spent(delta=1e-5)[0] == float("inf")
    assert engine.accountant.get_epsilon(1e-5, eps_error=0.01) == float("inf")  # Opacus' PRV keyword


def test_ghost_criterion_is_a_plain_mean_over_rows():
    """A weighted (or ignore_index) cross-entropy's own mean divides by a data-dependent total; the
    returned criterion takes the plain mean of the per-row losses, as the engine undoes it."""
    w = torch.tensor([1.0, 100.0, 1.0])
    engine, model, (m, opt, crit, loader) = setup(grad_sample_mode="ghost", criterion=nn.CrossEntropyLoss(weight=w))
    x, y = DATA.tensors[0][:10], DATA.tensors[1][:10]
    out = m(x)
    expected = nn.functional.cross_entropy(out, y, weight=w, reduction="none").mean()
    assert torch.allclose(crit(out, y), expected)
    assert not torch.allclose(nn.CrossEntropyLoss(weight=w)(out, y), expected)  # the weighted mean differs
    _, _, (_, _, default, _) = setup(grad_sample_mode="ghost")          # Opacus' default: cross-entropy
    assert torch.allclose(default(out, y), nn.functional.cross_entropy(out, y))


def test_a_refused_checkpoint_leaves_the_engine_as_it_was():
    """A checkpoint of another accountant kind is refused before the engine takes its seed (a script that
    catches the error and starts afresh would otherwise repeat that run's noise and batches)."""
    engine, model, (m, opt, loader) = setup()              # rdp
    steps(m, opt, loader, 2)
    fresh = PrivacyEngine(accountant="prv")
    seed = fresh.seed
    with pytest.raises(ValueError, match="rdp"):
        fresh.load_state_dict(engine.state_dict())
    assert fresh.seed == seed and fresh.accountant.steps == 0


def test_an_optimizer_state_without_its_engine_is_refused_whatever_the_optimizer():
    """The optimizer's state is stamped with the releases behind it: SGD without momentum (an empty
    state) and an engine state older than the optimizer's are caught; a state round-tripped at step 0
    (accelerate's prepare) is not."""
    engine, model, (m, opt, loader) = setup()               # SGD, no momentum: its torch state is empty
    steps(m, opt, loader, 1)
    old_engine = engine.state_dict()
    steps(m, opt, loader, 2)
    saved = opt.state_dict()
    _, _, (m2, opt2, loader2) = setup(PrivacyEngine(accountant="rdp"))
    opt2.load_state_dict(saved)
    with pytest.raises(DPError, match="released 3 steps"):
        steps(m2, opt2, loader2, 1)
    # the same run's engine state from step 1 beside its optimizer of step 3 (the stamp names the run by its
    # stored run id: another engine with the same seed is another run)
    later = PrivacyEngine(accountant="rdp")
    with pytest.warns(UserWarning, match="without a privacy ledger"):
        later.load_state_dict(old_engine)
    _, _, (m4, o4, l4) = setup(later)
    o4.load_state_dict(saved)
    with pytest.raises(DPError, match="has released 1"):
        steps(m4, o4, l4, 1)
    # accelerate's prepare round-trips the state at step 0, Adagrad has a state from construction
    model5 = nn.Linear(4, 3)
    _, o5, l5 = PrivacyEngine(accountant="rdp").make_private(
        module=model5, optimizer=torch.optim.Adagrad(model5.parameters()), data_loader=DataLoader(DATA, batch_size=24),
        noise_multiplier=1.0, max_grad_norm=1.0)
    o5.load_state_dict(o5.state_dict())
    steps(model5, o5, l5, 1)


def test_grad_scaler_is_refused_when_steps_signature_is_hidden():
    """accelerate wraps optimizer.step, so torch's GradScaler hands over grad_scale / found_inf as
    attributes instead of the grad_scaler keyword: refused the same way."""
    import functools
    import warnings

    engine, model, (m, opt, loader) = setup()
    inner = opt.step

    @functools.wraps(inner)
    def patched_step(*args, **kwargs):
        return inner(*args, **kwargs)
    patched_step.__wrapped__ = None
    del patched_step.__wrapped__
    opt.step = lambda *a, **k: patched_step(*a, **k)
    scaler = torch.amp.GradScaler("cpu")
    x, y = next(iter(loader))
    scaler.scale(nn.functional.cross_entropy(m(x), y)).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DPError, match="bfloat16"):
            scaler.step(opt)
    assert opt.steps == 0 and engine.get_epsilon(1e-5) == 0.0


def test_make_private_with_epsilon_after_a_resume_keeps_the_uninterrupted_sigma():
    def make(engine):
        model = nn.Linear(4, 3)
        return engine.make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(DATA, batch_size=24), target_epsilon=3.0, target_delta=1e-5, steps=10,
            max_grad_norm=1.0)

    first = PrivacyEngine(accountant="rdp", seed=3)
    m, o, l = make(first)
    steps(m, o, l, 4)
    resumed = PrivacyEngine(accountant="rdp")
    with pytest.warns(UserWarning, match="without a privacy ledger"):
        resumed.load_state_dict(first.state_dict())
    m2, o2, l2 = make(resumed)
    assert resumed.noise_multiplier == first.noise_multiplier
    steps(m2, o2, l2, 6)
    assert 0.9 * 3.0 < resumed.get_epsilon(1e-5) <= 3.0


def test_batch_memory_manager_supersedes_a_live_iterator_and_nests():
    from dpfast.utils.batch_memory_manager import BatchMemoryManager

    engine, model, (m, opt, loader) = setup(max_physical_batch_size=7)
    live = iter(loader)
    next(live)
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=opt):
        with pytest.raises(DPError, match="superseded"):
            next(live)                       # planned with chunks of 7: never silently used
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=3, optimizer=opt):
            assert loader.max_physical_batch_size == 3
        assert loader.max_physical_batch_size == 2
    assert loader.max_physical_batch_size == 7

    class Wrapped:  # accelerate's AcceleratedOptimizer keeps the DPOptimizer as .optimizer
        optimizer = opt
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=Wrapped()):
        pass
