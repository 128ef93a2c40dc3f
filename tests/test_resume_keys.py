"""Every resume keys the noise and the Poisson batches afresh (PrivacyEngine._resume_key).

Review 5 (F1, F2): the ledger's copy check sees copies through inodes only, so a run directory
restored from a backup onto the old inode, a volume snapshot, or a copy made before the first release
continued beside its original, and both released the same noise keys: the difference of two releases
of one key is the noise-free difference of their clipped sums. These tests run that attack on the
engine: two continuations of one checkpoint on neighbouring data sets.
"""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpfast import PrivacyEngine

N, DIM, B, SIGMA, CLIP = 64, 50, 8, 1.0, 1.0


def data(moved: int | None = None):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(N, DIM, generator=g), torch.randn(N, 1, generator=g)
    if moved is not None:  # the neighbouring data set: that record replaced
        x[moved], y[moved] = 10.0, -10.0
    return TensorDataset(x, y)


def engine_and_model(ds, deterministic=False, seed=None):
    torch.manual_seed(0)
    model = nn.Linear(DIM, 1, bias=False)
    engine = PrivacyEngine(accountant="rdp", seed=seed, deterministic_resume=deterministic)
    m, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                         data_loader=DataLoader(ds, batch_size=B), noise_multiplier=SIGMA,
                                         max_grad_norm=CLIP, backend="torch")
    return engine, m, opt, loader


def steps(m, opt, loader, n):
    done = 0
    while done < n:
        for x, y in loader:
            opt.zero_grad()
            (m(x) - y).square().mean().backward()
            if opt.step():
                done += 1
                if done == n:
                    return


def checkpoint(n):
    engine, m, opt, loader = engine_and_model(data())
    steps(m, opt, loader, n)
    return {"engine": copy.deepcopy(engine.state_dict()), "model": copy.deepcopy(m.state_dict())}


def continuation(ck, moved, deterministic):
    """One continuation of checkpoint ``ck`` (a copy of its directory), one release: the update it made."""
    engine, m, opt, loader = engine_and_model(data(moved), deterministic, seed=ck["engine"]["seed"])
    m.load_state_dict(ck["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "without a privacy ledger"
        engine.load_state_dict(ck["engine"])
    before = m.weight.detach().clone()
    steps(m, opt, loader, 1)
    return engine, (m.weight.detach() - before).reshape(-1)


@pytest.mark.parametrize("released", [0, 2])  # 0: a copy made before the first release (F1)
def test_two_continuations_of_one_checkpoint_never_share_noise(released):
    ck = checkpoint(released)
    ea, da = continuation(ck, moved=None, deterministic=False)
    eb, db = continuation(ck, moved=0, deterministic=False)
    assert ea.key_seed != eb.key_seed and ck["engine"]["key"] not in (ea.key_seed, eb.key_seed)
    assert ea.steps == eb.steps == released + 1
    # independent noise: the difference carries noise of std sqrt(2) sigma C / B per coordinate (norm
    # about 1.25 here); the clipped sums alone differ by at most 2C/B = 0.25
    assert (da - db).norm() > 2 * (2 * CLIP / B)


def test_deterministic_resume_keeps_the_key_and_so_the_hole_it_documents():
    """What the default closes: with the checkpoint's key, two continuations on neighbouring data sets
    release one noise draw twice, and their difference is the clipped sums' (at most 2C/B)."""
    from dpfast.random import poisson_mask

    ck = checkpoint(2)
    sampler = ck["engine"]["sampler"]
    batch = poisson_mask(N, sampler["sample_rate"], seed=ck["engine"]["key"], step=sampler["step"]).nonzero()
    ea, da = continuation(ck, moved=None, deterministic=True)
    eb, db = continuation(ck, moved=int(batch[0]), deterministic=True)  # a record of the batch both draw
    assert ea.key_seed == eb.key_seed == ck["engine"]["key"]
    gap = (da - db).norm()
    assert 0 < gap <= 2 * CLIP / B + 1e-6


def test_each_load_of_one_engine_draws_another_key():
    ck = checkpoint(1)["engine"]
    engine = PrivacyEngine(accountant="rdp")
    keys = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            engine.load_state_dict(ck)
            keys.add(engine.key_seed)
    assert len(keys) == 3 and ck["key"] not in keys and engine.seed == ck["seed"]
    assert engine.state_dict()["key"] == engine.key_seed  # the next checkpoint holds the key it released with


def test_checkpoint_key_is_checked_and_defaults_to_the_seed():
    ck = checkpoint(1)["engine"]
    for bad in ("7", -1, 1 << 64, True, 1.5):
        with pytest.raises(ValueError, match="checkpoint key must be an int"):
            PrivacyEngine(accountant="rdp").load_state_dict(dict(ck, key=bad))
    legacy = {k: v for k, v in ck.items() if k != "key"}  # written before keys were saved: keyed by its seed
    engine = PrivacyEngine(accountant="rdp", deterministic_resume=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine.load_state_dict(legacy)
    assert engine.key_seed == ck["seed"]


def test_a_resumed_loader_draws_poisson_batches_at_the_same_rate():
    """Fresh coins are Poisson coins at q: over many steps the batch size still averages q N."""
    ck = checkpoint(1)
    engine, m, opt, loader = engine_and_model(data(), seed=ck["engine"]["seed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine.load_state_dict(ck["engine"])
    assert loader.seed == engine.key_seed != ck["engine"]["key"] and loader.step == ck["engine"]["sampler"]["step"]
    sizes = [len(loader.batch_indices(s)) for s in range(loader.step, loader.step + 2000)]
    mean, q = sum(sizes) / len(sizes), loader.sample_rate
    assert abs(mean - q * N) < 5 * (q * (1 - q) * N / len(sizes)) ** 0.5


def test_copies_of_one_engine_object_draw_their_own_keys():
    """Review 6, F1: a deepcopy (or pickle) of an engine that loads one checkpoint draws its own key."""
    ck = checkpoint(1)["engine"]
    engine = PrivacyEngine(accountant="rdp")
    twin = copy.deepcopy(engine)
    assert twin._resume_pad != engine._resume_pad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine.load_state_dict(ck)
        twin.load_state_dict(ck)
    assert engine.key_seed != twin.key_seed


def test_a_warning_raised_as_an_error_leaves_the_engine_whole():
    """Review 6, F2: the load's warnings come after the whole state is in place, so a script running
    with warnings as errors never holds an engine whose key differs from its optimizer's."""
    ck = checkpoint(2)
    engine, m, opt, loader = engine_and_model(data(), seed=ck["engine"]["seed"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="without a privacy ledger"):
            engine.load_state_dict(ck["engine"])
    assert engine.optimizer.seed == engine.loader.seed == engine.key_seed != ck["engine"]["key"]
    assert engine.steps == 2 and loader.step == ck["engine"]["sampler"]["step"]


def test_state_dict_of_an_engine_waiting_for_make_private_keeps_the_loaded_progress():
    """Review 6, F3: a checkpoint of an engine that loaded one and has not run make_private yet is the
    loaded run's progress (steps, sampler position) under the engine's key, and resumes."""
    ck = checkpoint(3)["engine"]
    waiting = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        waiting.load_state_dict(ck)
    sd = waiting.state_dict()
    assert sd["steps"] == 3 and sd["sampler"]["step"] == ck["sampler"]["step"]
    assert sd["key"] == sd["sampler"]["seed"] == waiting.key_seed != ck["key"]
    assert sd["accountant"] == ck["accountant"]
    engine, m, opt, loader = engine_and_model(data(), seed=ck["seed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine.load_state_dict(sd)
    assert engine.steps == 3 and loader.step == ck["sampler"]["step"]


def test_copies_made_after_a_load_draw_their_own_keys():
    """Review 7, N1: a sweep that loads once and hands copies of the engine to workers (pickle,
    deepcopy, fork) must not run several continuations under one key; a chosen seed's engine keeps
    its seed, a drawn one gets a new seed too."""
    import os
    import pickle

    ck = checkpoint(1)["engine"]
    loaded = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded.load_state_dict(ck)
    copies = [copy.deepcopy(loaded), pickle.loads(pickle.dumps(loaded))]
    keys = {loaded.key_seed, *(c.key_seed for c in copies)}
    assert len(keys) == 3 and all(c.seed == loaded.seed and c.steps == loaded.steps for c in copies)
    assert copies[0].state_dict()["sampler"]["seed"] == copies[0].key_seed
    fresh = PrivacyEngine(accountant="rdp")  # never loaded: its OS-drawn seed keys its first run
    assert copy.deepcopy(fresh).seed != fresh.seed
    chosen = PrivacyEngine(accountant="rdp", seed=5)
    assert copy.deepcopy(chosen).seed == 5
    if hasattr(os, "fork"):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child reports its key and leaves at once
            os.write(w, str(loaded.key_seed).encode())
            os._exit(0)
        os.close(w)
        child_key = int(os.read(r, 64).decode())
        os.waitpid(pid, 0)
        assert child_key != loaded.key_seed


def test_malformed_ledger_releases_and_steps_are_refused_before_anything_changes(tmp_path):
    """Review 7, N2/N3: a release line that parses but cannot be charged, or a checkpoint whose steps
    are not a count, is refused with the engine untouched."""
    import json

    from dpfast.ledger import Ledger

    path = tmp_path / "ledger.jsonl"
    engine, m, opt, loader = engine_and_model(data())
    engine.ledger = Ledger(path)
    steps(m, opt, loader, 2)
    sd = copy.deepcopy(engine.state_dict())
    steps(m, opt, loader, 1)
    good = path.read_text()
    last = json.loads(good.splitlines()[-1])
    assert last["key"] == 2
    for bad in ({"q": 1.5}, {"sigma": -1.0}, {"sigma": None}, {"sampler_step": "3"}, {"key": True}):
        path.write_text("\n".join(good.splitlines()[:-1] + [json.dumps({**last, **bad})]) + "\n")
        fresh = PrivacyEngine(accountant="rdp", ledger=path, adopt_copied_ledger=True)
        seed, key = fresh.seed, fresh.key_seed
        with pytest.raises(ValueError, match="malformed release"):
            fresh.load_state_dict(sd)
        assert (fresh.seed, fresh.key_seed, fresh.accountant.steps, fresh._loads) == (seed, key, 0, 0)
    for bad in ("3", -1, None, 2.0):
        with pytest.raises(ValueError, match="checkpoint steps must be an int"):
            PrivacyEngine(accountant="rdp").load_state_dict(dict(sd, steps=bad))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_child_forked_after_make_private_cannot_release():
    """Its loader and optimizer hold the parent's keys: a step in the child would repeat the parent's
    noise, so the child's first step() is refused; the parent goes on."""
    import os

    engine, m, opt, loader = engine_and_model(data())
    steps(m, opt, loader, 1)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            steps(m, opt, loader, 1)
            os.write(w, b"released")
        except Exception as e:  # noqa: BLE001 - reported to the parent
            os.write(w, f"{type(e).__name__}: {e}".encode()[:500])
        os._exit(0)
    os.close(w)
    said = os.read(r, 600).decode()
    os.waitpid(pid, 0)
    assert said.startswith("DPError") and "forked from one whose engine had already run make_private" in said, said
    steps(m, opt, loader, 1)
    assert engine.steps == 2


def test_a_sampling_rate_outside_0_1_is_refused_before_it_reaches_the_ledger():
    """Review 8, R3: a rate above 1 was accepted, written to the ledger, and the run then refused at
    its resume as malformed; now it is refused where it is set."""
    model = nn.Linear(2, 1)
    for bad in (1.5, 0.0, -0.1):
        with pytest.raises(ValueError, match="sample_rate"):
            PrivacyEngine(accountant="rdp").make_private(
                module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                max_grad_norm=1.0, expected_batch_size=4, sample_rate=bad)
    engine = PrivacyEngine(accountant="rdp")
    with pytest.raises(ValueError, match="sample_rate must be in"):
        engine.sample_rate = 1.5
