"""Engine behaviour beyond exactness: no B x P allocation, noise statistics and split invariance,
Poisson loading, bad input, checkpoints."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils._python_dispatch import TorchDispatchMode

import dpfast
from dpfast import PrivacyEngine
from dpfast.errors import (BatchLayoutError, DPError, NonFiniteGradientError, PrivacyLeakError,
                           UnsupportedModuleError)


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))


def private(model, *, sigma=0.0, C=1.0, K=1, B=8, loader=None, mode="bk", **kw):
    engine = PrivacyEngine(accountant="rdp", seed=123)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    m, o, l = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma,
                                  max_grad_norm=C, multiplicity=K, expected_batch_size=None if loader else B,
                                  mode=mode, backend="torch", **kw)
    return engine, m, o, l


class MaxAlloc(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if torch.is_tensor(t):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("norm_method", ["ghost", "direct"])
def test_no_B_by_P_tensor_during_a_bk_step(norm_method):
    """Without materialized layers (dpfast.plan), no tensor of a layer's per-sample gradients of all B
    samples exists: the norms are taken chunk by chunk under the memory budget."""
    model = small_cnn()
    P = sum(p.numel() for p in model.parameters())
    B = 16
    dpfast.rules._norms.set_memory_budget(P // 4)  # force chunking: a layer's per-sample grads of all B
    try:                                            # samples would be larger than the budget
        _, m, o, _ = private(model, B=B, C=0.1, norm_method=norm_method)
        x = torch.randn(B, 1, 8, 8)
        with MaxAlloc() as mode:
            o.zero_grad()
            m(x).square().mean(1).mean().backward()
            o.step()
    finally:
        dpfast.rules._norms.set_memory_budget(dpfast.rules._norms.DEFAULT_MEMORY_BUDGET)
    assert mode.largest < B * P / 4, f"largest tensor {mode.largest} vs B*P={B * P}"


def test_materialized_layers_stay_within_their_budget():
    """max_materialized_bytes=0: a layer is materialized only where its per-sample gradients are no
    larger than the saved input and output gradient they free, so what the step holds never grows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(),
                          nn.Linear(4 * 16 * 16, 64))  # the Linear's 16k-element gradient per sample > its A + G
    engine, m, o, _ = private(model, B=8, C=0.1, norm_method="auto", max_materialized_bytes=0)
    x = torch.randn(8, 1, 16, 16)
    for _ in range(2):  # the first step measures, the second uses the cached choice
        o.zero_grad()
        m(x).square().mean(1).mean().backward()
        o.step()
    plan = {d["layer"]: d for d in engine.private_module.tape.last_plan}
    assert plan["4"]["strategy"] != "materialize"
    assert all(d["materialized_bytes"] <= 8 * 2 * 4 * 16 * 16 * 4 for d in plan.values())
    with pytest.raises(ValueError, match="max_materialized_bytes"):
        private(small_cnn(), max_materialized_bytes=-1)
    with pytest.raises(ValueError, match="norm_method"):
        private(small_cnn(), norm_method={"0": "fastest"})
    with pytest.raises(ValueError, match="two-pass"):
        private(small_cnn(), mode="two-pass", norm_method="materialize")


def _released(model, x, *, sigma, B_expected, chunks, seed=7):
    """Released gradient of one logical batch processed in ``chunks`` physical pieces."""
    m = copy.deepcopy(model)
    before = [p.detach().clone() for p in m.parameters()]
    engine = PrivacyEngine(accountant="rdp", seed=seed)
    m, o, _ = engine.make_private(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=1.0),
                                  noise_multiplier=sigma, max_grad_norm=1.0, expected_batch_size=B_expected,
                                  backend="torch", loss_reduction="sum")
    pieces = torch.tensor_split(x, chunks)
    for k, piece in enumerate(pieces):
        o._announce_chunk(len(piece), k == len(pieces) - 1)
        o.zero_grad()
        m(piece).square().mean(1).sum().backward()  # "sum": the same per-sample gradients whatever the split
        took = o.step()
        assert took == (k == len(pieces) - 1)
    return torch.cat([(b - p.detach()).flatten() for b, p in zip(before, m.parameters())])


def test_noise_is_identical_whatever_the_physical_split():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(10, 6)
    whole = _released(model, x, sigma=0.7, B_expected=10, chunks=1)
    split = _released(model, x, sigma=0.7, B_expected=10, chunks=3)
    torch.testing.assert_close(whole, split, rtol=1e-5, atol=1e-6)
    other_seed = _released(model, x, sigma=0.7, B_expected=10, chunks=1, seed=8)
    assert not torch.allclose(whole, other_seed)


def test_noise_mean_and_variance():
    # Noise on P coordinates with no data: each is N(0, (sigma*C/B)^2). For P = 200k draws, the sample
    # mean and variance are within 6 standard errors with probability > 1 - 4e-9 each.
    model = nn.Linear(1000, 200)
    sigma, C, B = 1.3, 0.5, 20
    _, m, o, _ = private(model, sigma=sigma, C=C, B=B)
    before = torch.cat([p.detach().flatten().clone() for p in m.parameters()])
    o._announce_chunk(0, True)
    o.zero_grad()
    assert o.step()
    noise = (before - torch.cat([p.detach().flatten() for p in m.parameters()])).double()
    std = sigma * C / B
    n = noise.numel()
    assert abs(noise.mean().item()) < 6 * std / math.sqrt(n)
    var_se = std ** 2 * math.sqrt(2 / (n - 1))
    assert abs(noise.var().item() - std ** 2) < 6 * var_se


def _loader(n=200, batch=20):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(ds, batch_size=batch)


def test_poisson_batch_sizes_and_physical_chunks():
    engine, m, o, loader = private(small_cnn(), loader=_loader(), sigma=1.0, max_physical_batch_size=7)
    assert len(loader) == 10 and engine.sample_rate == pytest.approx(0.1)
    sizes, logical = [], 0
    current = 0
    for x, y in loader:
        assert len(x) <= 7
        current += len(x)
        o.zero_grad()
        if len(x):
            nn.functional.cross_entropy(m(x), y, reduction="none").mean().backward()
        if o.step():
            sizes.append(current)
            current = 0
    assert len(sizes) == 10 and o.steps == 10
    # the union of the chunks is exactly the Poisson batch of each step
    expected = [len(loader.batch_indices(s)) for s in range(10)]
    assert sizes == expected


def test_poisson_membership_frequency():
    # 2000 samples x 50 steps at q=0.05: the membership count is Binomial(100000, 0.05); within 6 sd
    # with probability > 1 - 2e-9.
    from dpfast.data import DPDataLoader

    ds = TensorDataset(torch.zeros(2000, 1))
    dl = DPDataLoader(ds, sample_rate=0.05, seed=3, steps_per_epoch=20)
    count = sum(len(dl.batch_indices(s)) for s in range(50))
    n, q = 2000 * 50, 0.05
    assert abs(count - n * q) < 6 * math.sqrt(n * q * (1 - q))


def test_empty_batch_takes_a_noise_only_step():
    ds = TensorDataset(torch.randn(50, 1, 8, 8), torch.randint(0, 10, (50,)))
    engine, m, o, loader = private(small_cnn(), loader=DataLoader(ds, batch_size=1), sigma=1.0)
    empties = 0
    for x, y in loader:  # q = 0.02: about a third of the steps are empty
        o.zero_grad()
        if len(x) == 0:
            empties += 1
            assert x.shape == (0, 1, 8, 8)
        out = m(x)
        nn.functional.cross_entropy(out, y, reduction="none").sum().backward()
        assert o.step()
    assert empties > 0 and o.steps == len(loader)


def test_multi_rank_sharding_is_the_single_process_batch():
    from dpfast.data import DPDataLoader

    ds = TensorDataset(torch.zeros(500, 1))
    one = DPDataLoader(ds, sample_rate=0.1, seed=11, steps_per_epoch=10)
    ranks = [DPDataLoader(ds, sample_rate=0.1, seed=11, steps_per_epoch=10, rank=r, world_size=3)
             for r in range(3)]
    for s in range(5):
        union = torch.cat([r.batch_indices(s) for r in ranks]).sort().values
        assert torch.equal(union, one.batch_indices(s))


# --------------------------------------------------------------------------- bad input
def test_batchnorm_is_refused_and_fix_module_repairs_it():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    with pytest.raises(UnsupportedModuleError, match="fix_module"):
        private(model)
    fixed = dpfast.fix_module(model)
    assert isinstance(fixed[1], nn.GroupNorm) and fixed[1].num_channels == 8
    private(fixed)


def test_unsupported_trainable_layer_names_module_and_fix():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.gain

    model = nn.Sequential(nn.Linear(3, 3), Scale())
    with pytest.raises(UnsupportedModuleError, match=r"'1' \(Scale\).*gain.*requires_grad_\(False\)"):
        private(model)
    model[1].gain.requires_grad_(False)
    private(model)


def test_subclass_overriding_forward_is_refused():
    class Weird(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(UnsupportedModuleError, match="overrides forward"):
        private(nn.Sequential(Weird(2, 2)))


def test_rows_not_divisible_by_K_and_wrong_row_count():
    _, m, o, _ = private(nn.Linear(3, 1), K=4, B=2)
    with pytest.raises(BatchLayoutError, match="multiple of multiplicity"):
        m(torch.randn(6, 3))
    _, m, o, _ = private(nn.Linear(3, 1), K=2, B=2)
    o._announce_chunk(3, True)
    with pytest.raises(BatchLayoutError, match="6 rows"):  # refused at the layer's forward
        m(torch.randn(4, 3))  # 4 rows but 3 samples x K=2 = 6 expected
    # without an announced chunk the loss's rows are checked at step() (the layers agree among themselves)
    _, m, o, _ = private(nn.Linear(3, 1), K=2, B=2)
    m(torch.randn(4, 3)).sum().backward()
    o._chunk, o._chunk_pending = (3, True), True
    with pytest.raises(BatchLayoutError, match="6 rows"):
        o.step()


def test_nonfinite_loss_is_refused_and_nothing_changes():
    model = nn.Linear(3, 1)
    _, m, o, _ = private(model, B=2, nonfinite="raise")
    before = [p.detach().clone() for p in m.parameters()]
    x = torch.tensor([[1.0, 2.0, 3.0], [float("nan"), 0.0, 0.0]])
    m(x).sum().backward()
    with pytest.raises(NonFiniteGradientError, match=r"samples \[1\]"), \
            pytest.warns(UserWarning, match="reports infinity"):
        o.step()
    assert all(torch.equal(b, p) for b, p in zip(before, m.parameters()))
    assert o.steps == 0
    # the default nonfinite="zero" drops the sample instead
    _, m, o, _ = private(nn.Linear(3, 1), B=2)
    m(x).sum().backward()
    assert o.step() and o.stats["nonfinite"] == 1  # silently: a warning would name the bad record
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_parameter_used_outside_its_module_is_a_privacy_leak():
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x) + x @ self.lin.weight  # second use bypasses the rule

    _, m, o, _ = private(Leaky(), B=2)
    m(torch.randn(2, 3)).sum().backward()
    with pytest.raises(PrivacyLeakError, match="lin.weight"):
        o.step()


def test_input_without_batch_rows_first_is_refused():
    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.pos = nn.Linear(1, 3)

        def forward(self, x):
            return self.a(x) + self.pos(torch.ones(1, 1))  # shared by all samples

    _, m, o, _ = private(Broadcast(), B=4)
    with pytest.raises(BatchLayoutError, match="'pos'"):
        m(torch.randn(4, 3))


def test_second_forward_after_backward_is_refused():
    _, m, o, _ = private(nn.Linear(3, 1), B=2)
    m(torch.randn(2, 3)).sum().backward()
    with pytest.raises(DPError, match="called again"):
        m(torch.randn(2, 3))


def test_bad_arguments_get_clear_errors():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    e = PrivacyEngine(accountant="rdp")
    for kw, msg in [({"noise_multiplier": -1.0}, "noise_multiplier"), ({"max_grad_norm": 0.0}, "max_grad_norm"),
                    ({"multiplicity": 0}, "multiplicity"), ({"loss_reduction": "avg"}, "loss_reduction"),
                    ({"mode": "ghost"}, "mode"), ({"backend": "cuda"}, "backend")]:
        args = dict(module=model, optimizer=opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
        args.update(kw)
        with pytest.raises(ValueError, match=msg):
            e.make_private(**args)


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("deterministic", [True, False])
def test_checkpoint_resume_reproduces_the_uninterrupted_run(deterministic):
    """deterministic_resume: bit-exact. Default: every resume keys noise and batches afresh, so the
    parameters differ and the privacy spent is the same."""
    def run(stop_after=None, resume=None):
        torch.manual_seed(0)
        model = small_cnn()
        engine = PrivacyEngine(accountant="rdp", seed=99, deterministic_resume=deterministic)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        m, o, loader = engine.make_private(module=model, optimizer=opt, data_loader=_loader(), noise_multiplier=1.0,
                                           max_grad_norm=1.0, max_physical_batch_size=8, backend="torch")
        if resume is not None:
            m.load_state_dict(resume["model"])
            o.load_state_dict(resume["opt"])
            engine.load_state_dict(resume["engine"])
        for x, y in loader:
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y, reduction="none").mean().backward()
            if o.step() and stop_after is not None and o.steps == stop_after:
                return {"model": copy.deepcopy(m.state_dict()), "opt": copy.deepcopy(o.state_dict()),
                        "engine": copy.deepcopy(engine.state_dict())}
        return m.state_dict(), engine.get_epsilon(1e-5)

    full, eps_full = run()
    ckpt = run(stop_after=4)
    resumed, eps_resumed = run(resume=ckpt)
    assert all(torch.equal(full[k], resumed[k]) for k in full) is deterministic
    assert eps_full == pytest.approx(eps_resumed)


def test_deepcopy_of_a_private_model_is_a_plain_model_with_its_own_weights():
    # EMA code deep-copies the model after make_private; the copy must compute with its own weights
    # and must never record into the original's tape.
    _, m, o, _ = private(small_cnn(), B=4)
    ema = copy.deepcopy(m)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    x = torch.randn(4, 1, 8, 8)
    dpfast.remove_private(copy.deepcopy(m))  # harmless on a copy
    ref = small_cnn()
    ref.load_state_dict(ema.state_dict())
    torch.testing.assert_close(ema(x), ref(x))
    m(x).square().mean(1).mean().backward()
    ema(x).sum().backward()          # grad-enabled use of the copy between backward and step
    assert o.step()
    dpfast.remove_private(m)
    assert "forward" not in vars(m[0])


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_make_private_with_epsilon_meets_the_target_after_the_planned_epochs(accountant):
    ds = TensorDataset(torch.randn(100, 3), torch.randn(100, 1))
    engine = PrivacyEngine(accountant=accountant, seed=1)
    model = nn.Linear(3, 1)
    m, o, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(ds, batch_size=10), target_epsilon=3.0, target_delta=1e-5, epochs=2,
        max_grad_norm=1.0)
    assert engine.noise_multiplier > 0
    for _ in range(2):
        for x, y in loader:
            o.zero_grad()
            (m(x) - y).square().flatten(1).mean(1).mean().backward()
            o.step()
    assert o.steps == 20
    eps = engine.get_epsilon(1e-5)
    assert 0.9 * 3.0 < eps <= 3.0


def test_make_private_with_epsilon_takes_a_public_sample_rate():
    """With sample_rate the calibrated sigma and the epochs budget depend on q alone, not on the data
    set's size, which add/remove adjacency treats as private."""
    sigmas = []
    for n in (100, 101, 140):
        engine = PrivacyEngine(accountant="rdp", seed=1)
        model = nn.Linear(3, 1)
        ds = TensorDataset(torch.randn(n, 3), torch.randn(n, 1))
        engine.make_private_with_epsilon(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=DataLoader(ds, batch_size=10), target_epsilon=3.0,
                                         target_delta=1e-5, epochs=2, max_grad_norm=1.0, sample_rate=0.1)
        assert engine.sample_rate == 0.1
        sigmas.append(engine.noise_multiplier)
    assert sigmas[0] == sigmas[1] == sigmas[2]
    with pytest.raises(ValueError, match="sample_rate"):
        PrivacyEngine().make_private_with_epsilon(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                  data_loader=DataLoader(ds, batch_size=10), target_epsilon=3.0,
                                                  target_delta=1e-5, epochs=2, max_grad_norm=1.0, sample_rate=1.5)


def test_gradient_accumulation_over_loader_batches_is_refused_not_silently_dropped():
    """Issue 17: backward on several loader batches, then one step(), used to drop every batch but the
    last with one warning (149 samples in, 44 released). Now the loader refuses at the second batch,
    naming the dpfast way (a larger batch_size with max_physical_batch_size); nothing is released."""
    import warnings

    from torch.utils.data import DataLoader, TensorDataset

    from dpfast import PrivacyEngine
    from dpfast.errors import DPError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1))
    loader = DataLoader(TensorDataset(torch.randn(300, 4)), batch_size=50)
    engine = PrivacyEngine(seed=1)
    model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                             data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(DPError, match="Gradient accumulation over loader batches is not supported.*max_physical_batch_size"):
        for i, (x,) in enumerate(loader):
            (model(x) ** 2).mean().backward()
            if i % 2 == 1:
                opt.step()
                opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert engine.accountant.steps == 0 and engine.get_epsilon(1e-5) < float("inf")
    # leaving a loop before step() and starting a new one is still allowed (that batch is dropped)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for (x,) in loader:
            (model(x) ** 2).mean().backward()
            break
        for (x,) in loader:
            opt.zero_grad()
            (model(x) ** 2).mean().backward()
            assert opt.step()
            break
    assert engine.accountant.steps == 1


def test_a_discarded_batch_that_wrote_state_loses_the_guarantee():
    """A batch left before step() is dropped; if its forward wrote a persistent buffer (a record's
    value), the next chunk's snapshot would hide the write and the model would carry it out: epsilon
    becomes infinite instead (review finding on the discard paths)."""
    import warnings

    from torch.utils.data import DataLoader, TensorDataset

    from dpfast import PrivacyEngine

    class Remember(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)
            self.register_buffer("last", torch.zeros(4))

        def forward(self, x):
            if len(x):
                self.last.copy_(x[0].detach())
            return self.lin(x)

    torch.manual_seed(0)
    model = Remember()
    loader = DataLoader(TensorDataset(torch.randn(300, 4)), batch_size=50)
    engine = PrivacyEngine(seed=1)
    model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                             data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for (x,) in loader:
            (model(x) ** 2).mean().backward()
            break                         # left before step(): the batch is discarded
        for (x,) in loader:               # the new iterator discards it, and sees the write
            break
    assert engine.get_epsilon(1e-5) == float("inf") and "PrivacyLeakError" in engine.why_no_privacy


def test_took_step_marks_logical_steps_for_schedulers_and_ema():
    """With physical chunks the loader yields more batches than logical steps: took_step (= step()'s return,
    which accelerate's wrapper loses) is True exactly on logical steps."""
    from torch.utils.data import DataLoader, TensorDataset

    from dpfast import PrivacyEngine

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1))
    loader = DataLoader(TensorDataset(torch.randn(200, 4)), batch_size=40)
    engine = PrivacyEngine(seed=3)
    model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                             data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                             max_physical_batch_size=8)
    chunks = logical = 0
    for (x,) in loader:
        opt.zero_grad()
        if len(x):
            (model(x) ** 2).mean().backward()
        returned = opt.step()
        assert opt.took_step is returned
        chunks += 1
        logical += opt.took_step
    assert logical == engine.accountant.steps == len(loader) and chunks > logical


def test_an_iterator_started_before_a_checkpoint_load_can_yield_nothing_more():
    """An iterator planned its logical steps from the sampler's position when it started; after
    load_state_dict moves the sampler (to a checkpoint of the same seed), its remaining steps are
    batches the checkpointed run already released. It must stop instead of releasing them again."""
    def make():
        torch.manual_seed(0)
        engine = PrivacyEngine(accountant="rdp", seed=99)
        model = small_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return engine, *engine.make_private(module=model, optimizer=opt, data_loader=_loader(), noise_multiplier=1.0,
                                            max_grad_norm=1.0, max_physical_batch_size=1, backend="torch")
    engine, m, o, loader = make()
    for x, y in loader:
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y, reduction="none").mean().backward()
        if o.step() and o.steps == 4:
            break
    ckpt = copy.deepcopy(engine.state_dict())
    engine2, m2, o2, loader2 = make()
    it = iter(loader2)
    first = next(it)                           # one chunk of step 0: the plan is made
    with pytest.raises(ValueError, match="waiting for optimizer.step"):
        engine2.load_state_dict(ckpt)          # that chunk would be released after the load
    import itertools

    for x, y in itertools.chain([first], it):  # finish logical step 0; the iterator stays live
        o2.zero_grad()
        if len(x):
            nn.functional.cross_entropy(m2(x), y, reduction="none").mean().backward()
        if o2.step():
            break
    engine2.load_state_dict(ckpt)              # at step 4: ahead of the one step released here
    with pytest.raises(DPError, match="superseded"):
        next(it)


def test_profile_lists_each_layers_strategy_and_share():
    torch.manual_seed(0)
    engine, m, o, _ = private(small_cnn(), B=8, C=0.1, norm_method={"0": "materialize", "*": "auto"})
    x = torch.randn(8, 1, 8, 8)
    for _ in range(3):
        o.zero_grad()
        m(x).square().mean(1).mean().backward()
        o.step()
    prof = engine.profile
    layers = {d["layer"]: d for d in prof["layers"]}
    assert layers["0"]["strategy"] == "materialize" and layers["0"]["materialized_bytes"] > 0
    assert prof["step_s"] > 0 and sum(prof["strategies"].values()) == len(layers)
    measured = [d for d in layers.values() if d["times"]]
    assert measured and all(0 < d["share"] < 1 for d in measured)


def test_calibration_skips_only_a_norm_form_its_flop_model_rules_out(monkeypatch):
    """A 3x3 conv at 32x32 (ghost models T (d + p) / (d p) = 1024 x 40 / 288 = 142x the direct
    norm's FLOPs) is not timed in ghost form; a 4x4 one (T = 16: 2.2x) times both; a Linear with one
    position (ghost 2 (d + p) against 2 d p) is not timed in direct form. Materialize is always timed."""
    from dpfast import plan

    monkeypatch.setenv("DPFAST_PLAN_CACHE", "0")
    monkeypatch.setattr(plan, "_PLANNER", None)
    times = {}
    for name, model, x in [("big", nn.Conv2d(32, 8, 3, padding=1), torch.randn(4, 32, 32, 32)),
                           ("small", nn.Conv2d(32, 8, 3, padding=1), torch.randn(4, 32, 4, 4)),
                           ("lin", nn.Linear(64, 64), torch.randn(4, 64))]:
        engine, m, o, _ = private(model, B=4, C=1.0)
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
        times[name] = set(engine.profile["layers"][0]["times"])
    assert times == {"big": {"direct", "materialize"}, "small": {"ghost", "direct", "materialize"},
                     "lin": {"ghost", "materialize"}}, times


@pytest.mark.parametrize("norm_method", ["materialize", "ghost"])
def test_a_nonfinite_sample_is_dropped_from_materialized_layers(norm_method):
    """A NaN sample's per-sample gradients are zeroed before the clipped sum (0 * NaN would be NaN):
    the release is that of the batch without it."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    bad = x.clone()
    bad[2] = math.nan

    def released(xs, keep):
        m = copy.deepcopy(model)
        before = [p.detach().clone() for p in m.parameters()]
        engine = PrivacyEngine(accountant="rdp", seed=3)
        m, o, _ = engine.make_private(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=1.0),
                                      noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=5,
                                      loss_reduction="sum", backend="torch", norm_method=norm_method)
        o.zero_grad()
        (m(xs).square().sum(1) * keep).sum().backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            o.step()
        return torch.cat([(b - p.detach()).flatten() for b, p in zip(before, m.parameters())])

    import warnings

    keep = torch.ones(5, dtype=torch.float64)
    got = released(bad, keep)
    keep[2] = 0
    want = released(x, keep)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("content", ["[]", "null", '{"version": 2, "machines": []}', "{not json",
                                     '{"version": 2, "machines": {"M": {"k": 3, "j": {"strategy": "ghost"},'
                                     ' "i": {"strategy": "ghost", "times": {"ghost": "fast"}}}}}'])
def test_a_damaged_plan_cache_costs_only_a_new_measurement(tmp_path, content):
    from dpfast import plan

    path = tmp_path / "plan-v2.json"
    path.write_text(content.replace('"M"', json.dumps(plan._machine())))
    planner = plan.Planner(path)
    assert planner.choices == {}
    entry = planner.record("key", {"ghost": 1e-5, "materialize": 2e-5})
    assert entry["strategy"] == "ghost" and plan.Planner(path).lookup("key") == entry
