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
    assert len(out) == 4 and out[2] is criterion
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
    (dict(grad_sample_mode="ghost"), "criterion="),
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
    engine2 = PrivacyEngine(accountant="rdp")
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
    # an engine that already drew its own seed and made a model private refuses another run's checkpoint
    engine3, _, (m3, o3, _) = setup(PrivacyEngine(accountant="rdp"))
    with pytest.raises(ValueError, match="another seed"):
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
