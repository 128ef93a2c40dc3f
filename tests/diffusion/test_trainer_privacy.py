"""What the trainer releases is covered by the guarantee (outside review, helper-27).

Each record's training randomness (diffusion noise, noise level, label dropout, augmentation) is
keyed by the record alone (dpfast.random.record_generators), so a neighbouring data set moves the
released clipped sum by at most C: the bound the accountant assumes. With one stream drawn in batch
order (the trainer before this fix) one added record moved the sum by 4.6 C (K=1) and 3.4 C (K=4)."""
from __future__ import annotations

import json
import re
import tempfile
import warnings

import numpy as np
import pytest
import torch

from dpfast.diffusion.augment import make_augment
from dpfast.diffusion.data import ImageDataset
from dpfast.diffusion.edm import edm_draws
from dpfast.diffusion.presets import ConfigError, TrainConfig
from dpfast.diffusion.trainer import Trainer
from dpfast.random import record_generators


def _cfg(K, conditional, physical=64, **kw):
    return TrainConfig(resolution=None, nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), multiplicity=K,
                       batch_size=64, steps=5, lr=1e-3, class_conditional=conditional,
                       num_classes=3 if conditional else None, noise_multiplier=1.0, target_epsilon=None,
                       grid_every=0, grid_size=2, sample_steps=2, checkpoint_every=100, device="cpu", threads=1,
                       max_physical_batch_size=physical, max_grad_norm=1.0, noise_seed=1234,
                       augment="flip+crop" if conditional else "none", **kw)


def _released_sum(images, labels, cfg):
    """The first private step's clipped sum (the mean before noise, times the batch size), sigma 0."""
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = Trainer(cfg, out, dataset=ImageDataset(images, labels, 3 if cfg.class_conditional else 0, "private"),
                    progress=False, log=lambda *a, **k: None)
        try:
            t.optimizer.noise_multiplier = 0.0
            inner = t.optimizer.original_optimizer
            step, grabbed = inner.step, {}

            def grab(*a, **k):
                grabbed["g"] = torch.cat([p.grad.flatten() for p in t.optimizer.params]).double()
                return step(*a, **k)

            inner.step = grab
            next(t._private_steps())
        finally:
            t.lock.release()
        return grabbed["g"] * cfg.batch_size


@pytest.mark.parametrize("K,conditional", [(1, False), (4, True)])
def test_one_added_record_moves_the_clipped_sum_by_at_most_C(K, conditional):
    rng = np.random.default_rng(0)
    N = 24  # q = 1: every record is in the batch
    images = rng.integers(0, 256, (N + 1, 1, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 3, N + 1)
    cfg = _cfg(K, conditional)
    without = _released_sum(images[:N], labels[:N], cfg)
    with_one = _released_sum(images, labels, cfg)  # the neighbour: one record added, at the next index
    moved = float((with_one - without).norm())
    assert 0 < moved <= cfg.max_grad_norm * (1 + 1e-5), f"the sum moved by {moved / cfg.max_grad_norm:.2f} C"


def test_a_records_draws_do_not_depend_on_the_chunking():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (10, 1, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 3, 10)
    whole = _released_sum(images, labels, _cfg(2, True, physical=64))
    chunked = _released_sum(images, labels, _cfg(2, True, physical=3))
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-7)


def test_edm_draws_per_sample_generators_are_the_one_sample_draws():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 1, 6, 6, generator=g)
    labels = torch.tensor([0, 1, 2])
    augment = make_augment("flip+crop", 1)
    kw = dict(p_mean=-1.2, p_std=1.2, label_dropout=0.5, augment=augment, num_classes=3, coins=1)
    batch = edm_draws(images, labels, 2, generators=record_generators([5, 9, 11], seed=7, step=3), **kw)
    for i, j in enumerate([5, 9, 11]):
        alone = edm_draws(images[i:i + 1], labels[i:i + 1], 2,
                          generator=record_generators([j], seed=7, step=3)[0], **kw)
        for got, want in zip(batch, alone):
            torch.testing.assert_close(got[2 * i:2 * i + 2], want, rtol=0, atol=0)
    other = edm_draws(images[:2], labels[:2], 2, generators=record_generators([5, 9], seed=7, step=4), **kw)
    assert not torch.equal(other[3], batch[3][:4])  # another step: other draws
    with pytest.raises(ValueError, match="takes generator="):
        edm_draws(images, labels, 2, generators=record_generators([1, 2, 3], seed=7, step=3),
                  **{**kw, "augment": lambda x: x})


def test_dropout_is_refused_with_dp():
    images = np.zeros((8, 1, 8, 8), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as out, pytest.raises(ConfigError, match="dropout"):
        Trainer(_cfg(1, False, dropout=0.1), out, dataset=ImageDataset(images, np.zeros(8, dtype=np.int64), 0,
                                                                       "private"),
                progress=False, log=lambda *a, **k: None)


def test_the_progress_bar_does_not_show_a_private_loss(capsys):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (12, 1, 8, 8), dtype=np.uint8)
    cfg = _cfg(1, False, physical=64)
    cfg.steps, cfg.batch_size = 3, 6
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(cfg, out, dataset=ImageDataset(images, np.zeros(12, dtype=np.int64), 0, "private"),
                progress=True, log=lambda *a, **k: None).train()
    err = capsys.readouterr().err
    assert "loss=private" in err and not re.search(r"loss=[-\d]", err), err[-500:]


def test_model_pt_and_config_json_withhold_a_pinned_noise_seed_and_the_report_says_it_was_pinned():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (12, 1, 8, 8), dtype=np.uint8)
    cfg = _cfg(1, False)
    cfg.steps, cfg.batch_size = 2, 6
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(cfg, out, dataset=ImageDataset(images, np.zeros(12, dtype=np.int64), 0, "private"),
                progress=False, log=lambda *a, **k: None).train()
        model = torch.load(f"{out}/model.pt", map_location="cpu", weights_only=False)
        report = json.loads(open(f"{out}/privacy_report.json").read())
        config = json.loads(open(f"{out}/config.json").read())
    assert cfg.noise_seed == 1234 and model["config"]["noise_seed"] is None and config["noise_seed"] is None
    assert report["noise_seed_pinned"] is True


def test_resuming_a_checkpoint_from_before_per_record_randomness_loses_the_guarantee():
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (12, 1, 8, 8), dtype=np.uint8)
    cfg = _cfg(1, False)
    cfg.steps, cfg.batch_size, cfg.checkpoint_every = 4, 6, 1
    data = ImageDataset(images, np.zeros(12, dtype=np.int64), 0, "private")
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(cfg.replace(max_steps=2), out, dataset=data, progress=False, log=lambda *a, **k: None).train()
        state = torch.load(f"{out}/checkpoint.pt", map_location="cpu", weights_only=False)
        assert state.pop("record_randomness") == 1
        torch.save(state, f"{out}/checkpoint.pt")  # as an older dpfast train wrote it
        Trainer(cfg, out, dataset=data, progress=False, log=lambda *a, **k: None).train()
        report = json.loads(open(f"{out}/privacy_report.json").read())
    assert report["epsilon"] == float("inf") and "batch order" in report["guarantee_lost"]


def _resumable_run():
    """64 private 8x8 images, a 4-step config checkpointing every 2 steps, a silent log."""
    rng = np.random.default_rng(0)
    data = ImageDataset(torch.from_numpy(rng.random((64, 1, 8, 8), dtype=np.float32) * 2 - 1),
                        torch.zeros(64, dtype=torch.long), 0, "private")
    return data, _cfg(1, False).replace(steps=4, checkpoint_every=2), (lambda *a, **k: None)


def test_a_checkpoint_copied_to_a_new_out_is_refused_in_one_line(tmp_path):
    """Review 3, M2 (/tmp/review3/r2b_trainer_copy.py): a run's checkpoint.pt copied to another --out
    resumed next to an empty ledger and released the original run's later noise keys and batches
    again. It is now a ConfigError (the CLI's one-line refusal) before anything is released."""
    import shutil

    from dpfast.diffusion.trainer import train

    data, cfg, quiet = _resumable_run()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg.replace(max_steps=2), tmp_path / "a", dataset=data, progress=False, log=quiet)
        (tmp_path / "b").mkdir()
        shutil.copy(tmp_path / "a" / "checkpoint.pt", tmp_path / "b" / "checkpoint.pt")
        with pytest.raises(ConfigError, match="cannot resume .* is not this checkpoint's run's"):
            train(cfg, tmp_path / "b", dataset=data, progress=False, log=quiet)
        assert not (tmp_path / "b" / "privacy_ledger.jsonl").exists() or not any(
            '"key"' in line for line in (tmp_path / "b" / "privacy_ledger.jsonl").read_text().splitlines())
        train(cfg, tmp_path / "a", dataset=data, progress=False, log=quiet)  # in its own --out it resumes
    report = json.loads((tmp_path / "a" / "privacy_report.json").read_text())
    assert report["steps"] == 4 and report["releases_charged"] == 4


def test_a_copied_run_directory_is_refused_unless_adopted(tmp_path):
    """Review 4, N2 (/tmp/review4/r5b_trainer_copytree.py): copying the whole --out (checkpoint and
    ledger) and continuing both re-released keys 2 and 3 twice. The copy is refused; adopted (the
    original will never continue) it goes on."""
    import shutil

    from dpfast.diffusion.trainer import train

    data, cfg, quiet = _resumable_run()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg.replace(max_steps=2), tmp_path / "a", dataset=data, progress=False, log=quiet)
        shutil.copytree(tmp_path / "a", tmp_path / "b")
        with pytest.raises(ConfigError, match="cannot resume .* is a copy .*--adopt-copied-run"):
            train(cfg, tmp_path / "b", dataset=data, progress=False, log=quiet)
        train(cfg.replace(adopt_copied_run=True), tmp_path / "b", dataset=data, progress=False, log=quiet)
    report = json.loads((tmp_path / "b" / "privacy_report.json").read_text())
    assert report["steps"] == 4 and report["releases_charged"] == 4


def test_adopting_a_copy_is_never_written_to_the_runs_config():
    """Review 5, F3: config.json is how a run's settings are reused (--config OUT/config.json); an
    adoption stored there would silently adopt every later copy."""
    from dpfast.diffusion.trainer import public_config

    assert public_config(_cfg(1, False).replace(adopt_copied_run=True))["adopt_copied_run"] is False
    assert public_config(_cfg(1, False).replace(deterministic_resume=True))["deterministic_resume"] is False
