"""End-to-end private training on a tiny IDX data set: checkpoints, exact resume, reports, CLI."""
import json

import dpfast
import numpy as np
import pytest
import torch

from dpfast.diffusion.presets import PRESETS, TrainConfig, get_preset

from .test_data import write_mnist_dir

pytest.importorskip("dpfast.engine", reason="dpfast.engine (the DP engine) is not available yet")

# 8x8 images, a U-Net with attention at 4x4; Poisson batches of ~12 of 48 samples, K=2 rows each, in
# physical chunks of 5 samples, so logical steps span several chunks (and may have empty ones).
TINY = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), multiplicity=2, num_classes=3,
            batch_size=12, steps=6, lr=1e-3, ema_decay=0.9, max_physical_batch_size=5,
            target_epsilon=None, noise_multiplier=1.0, accountant="rdp", backend="torch",
            noise_seed=1234, seed=0, device="cpu", sample_steps=3, grid_size=2, grid_every=0,
            checkpoint_every=2, epsilon_every_seconds=0.0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_mnist_dir(tmp_path_factory.mktemp("data") / "idx", n=48, size=8, classes=3)


def run(cfg, out):
    from dpfast.diffusion.trainer import Trainer

    return Trainer(cfg, out, progress=False, log=lambda *a: None).train()


def final_state(out):
    return torch.load(out / "checkpoint.pt", weights_only=False)


def assert_same_run(a, b):
    for part in ("model",):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), k
    for k in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for i in sa:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    assert a["engine"]["accountant"] == b["engine"]["accountant"]
    assert a["engine"]["sampler"] == b["engine"]["sampler"]
    assert torch.equal(a["loss_rng"], b["loss_rng"])


def test_stopped_and_crashed_runs_resume_bit_for_bit(data_dir, tmp_path, monkeypatch):
    cfg = TrainConfig(data_dir=str(data_dir), **TINY)
    full = tmp_path / "full"
    result = run(cfg, full)
    assert result["steps"] == 6 and result["reason"] == "done"

    # stopped by --max-steps, then resumed by the same command without it
    part = tmp_path / "part"
    assert run(cfg.replace(max_steps=3), part)["steps"] == 3
    assert run(cfg.replace(deterministic_resume=True), part)["steps"] == 6
    assert_same_run(final_state(full), final_state(part))
    # by default the resume keys noise and batches afresh (PrivacyEngine._resume_key): same accounting,
    # another run
    fresh = tmp_path / "fresh"
    assert run(cfg.replace(max_steps=3), fresh)["steps"] == 3
    assert run(cfg, fresh)["steps"] == 6
    a, b = final_state(full), final_state(fresh)
    assert a["engine"]["steps"] == b["engine"]["steps"] and a["engine"]["key"] != b["engine"]["key"]
    assert a["engine"]["accountant"] == b["engine"]["accountant"]
    assert any(not torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    # killed after step 5 (no final checkpoint): the step-4 checkpoint is what survives
    from dpfast.diffusion import trainer as trainer_mod

    crashed = tmp_path / "crashed"
    real_update = trainer_mod.EMA.update

    def update_then_crash(self, module):
        real_update(self, module)
        if self.num_updates == 5:
            raise RuntimeError("simulated kill")

    monkeypatch.setattr(trainer_mod.EMA, "update", update_then_crash)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(cfg, crashed)
    monkeypatch.setattr(trainer_mod.EMA, "update", real_update)
    assert final_state(crashed)["step"] == 4
    # step 5 was released before the kill, and the privacy ledger says so: the resumed run charges it
    # and re-runs steps 5 and 6 with fresh noise keys and batches (never the same key twice)
    with pytest.warns(UserWarning, match="1 steps released after this checkpoint"):
        assert run(cfg, crashed)["steps"] == 6
    keys = [e["key"] for e in dpfast.ledger.releases(crashed / "privacy_ledger.jsonl")]
    assert keys == list(range(7))
    report = json.loads((crashed / "privacy_report.json").read_text())
    from dpfast.accounting import compute_epsilon

    assert report["releases_charged"] == 7
    assert report["epsilon"] == pytest.approx(compute_epsilon(1.0, 12 / 48, 7, 1e-5, "rdp"))


def test_outputs_and_privacy_report(data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(data_dir=str(data_dir), **dict(TINY, steps=3))
    run(cfg, out)
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["private"] and report["complete"]
    assert report["steps"] == 3 and report["noise_multiplier"] == 1.0
    assert report["sample_rate"] == pytest.approx(12 / 48) and report["delta"] == 1e-5
    assert report["adjacency"].startswith("add/remove-one") and report["accountant"] == "rdp"
    from dpfast.accounting import compute_epsilon

    assert report["epsilon"] == pytest.approx(compute_epsilon(1.0, 0.25, 3, 1e-5, "rdp"))
    assert (out / "samples.png").exists() and (out / "model.pt").exists()
    assert json.loads((out / "config.json").read_text())["nf"] == 8
    # a different configuration is refused, a run-control change is accepted
    with pytest.raises(ValueError, match="different configuration"):
        run(cfg.replace(lr=0.1), out)
    assert run(cfg.replace(max_steps=3, device="cpu"), out)["steps"] == 3


def test_calibrated_sigma_meets_the_target(data_dir, tmp_path):
    cfg = TrainConfig(data_dir=str(data_dir), **dict(TINY, steps=2, noise_multiplier=None,
                                                      target_epsilon=8.0, accountant="prv"))
    report = run(cfg, tmp_path / "cal")["report"]
    assert report["target_epsilon"] == 8.0
    assert report["epsilon"] <= 8.0 * 1.01  # after all planned steps the spend is at the target
    assert report["epsilon"] >= 8.0 * 0.95


def test_time_budget_checkpoints_and_stops(data_dir, tmp_path):
    cfg = TrainConfig(data_dir=str(data_dir), **dict(TINY, time_budget=0.0))
    result = run(cfg, tmp_path / "tb")
    assert result["reason"] == "time budget" and result["steps"] == 0
    assert final_state(tmp_path / "tb")["step"] == 0


def test_cli_train_sample_evaluate(data_dir, tmp_path, capsys):
    from dpfast.diffusion.cli import main

    out = tmp_path / "cli"
    args = ["train", "--preset", "demo", "--out", str(out), "--data-dir", str(data_dir), "--no-progress",
            "--num-classes", "3",
            "--resolution", "none", "--nf", "8", "--ch-mult", "1,2", "--attn-resolutions", "", "--batch-size", "12",
            "--steps", "2", "--multiplicity", "2", "--noise-multiplier", "1.0", "--accountant", "rdp",
            "--backend", "torch", "--sample-steps", "2", "--grid-size", "2", "--augment", "flip+crop"]
    assert main(args) == 0
    assert json.loads((out / "privacy_report.json").read_text())["steps"] == 2
    samples = tmp_path / "s.npz"
    assert main(["sample", "--model", str(out), "--num", "30", "--out", str(samples), "--steps", "2",
                 "--device", "cpu"]) == 0
    with np.load(samples) as f:
        assert f["images"].shape == (30, 1, 8, 8) and f["images"].dtype == np.uint8
        assert f["labels"].tolist() == [i % 3 for i in range(30)]
    # the grid has one class per row, as the training grids, each row named
    from PIL import Image

    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", str(out), "--num", "30", "--out", str(samples), "--steps", "2",
                 "--device", "cpu", "--grid", str(grid), "--no-progress"]) == 0
    with Image.open(grid) as im, Image.open(out / "samples.png") as train_grid:
        cell = 24 + 2                                # 8x8 images enlarged 3x (28 // 8), 2-pixel border
        assert (im.height - 2) // cell == 3          # 3 classes, 10 images each
        assert im.width > 10 * cell + 2              # a margin with the class names
        assert train_grid.width > 2 * cell + 2       # the training grid (2x2) names its rows too
    rep = tmp_path / "eval.json"
    assert main(["evaluate", "--samples", str(samples), "--data-dir", str(data_dir), "--epochs", "1",
                 "--feature-steps", "2", "--feature-cache", str(tmp_path / "feat.pt"), "--no-progress",
                 "--sizes", "20,2000", "--out", str(rep)]) == 0
    report = json.loads(rep.read_text())
    assert list(report["downstream"]) == ["20", "30"]     # 2000 > 30 samples: all of them
    assert 0 <= report["downstream"]["30"]["test_accuracy"] <= 1
    assert report["downstream"]["30"]["validation_samples"] == 3
    feats = report["features"]
    assert "NOT Inception" in feats["note"] and np.isfinite(feats["fid"])
    assert 0 <= feats["precision"] <= 1 and 0 <= feats["recall"] <= 1
    # a non-DP network of the private training set computed them: marked private, in the file and the line
    assert feats["private"] is True and "not covered by epsilon" in feats["privacy_note"]
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("feature-space FID")]
    assert "PRIVATE" in line and "not covered by epsilon" in line


def test_presets():
    eps = {name: get_preset(name).target_epsilon for name in PRESETS if name.startswith("dpdm")}
    assert eps == {"dpdm-fmnist-eps10": 10.0, "dpdm-fmnist-eps1": 1.0, "dpdm-fmnist-eps0.2": 0.2}
    dpdm = get_preset("dpdm-fmnist-eps1", max_steps=10)
    assert (dpdm.batch_size, dpdm.multiplicity, dpdm.epochs, dpdm.max_grad_norm, dpdm.lr, dpdm.ema_decay,
            dpdm.delta, dpdm.nf, dpdm.ch_mult, dpdm.attn_resolutions) == (
        4096, 32, 300.0, 1.0, 3e-4, 0.999, 1e-5, 32, (1, 2, 2), (7,))
    assert dpdm.max_steps == 10
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("nope")
    with pytest.raises(ValueError, match="unknown config fields"):
        get_preset("demo", learning_rate=1.0)
    assert TrainConfig.from_dict(dpdm.to_dict()) == dpdm


def test_non_private_baseline(data_dir, tmp_path):
    """--no-private trains on the same kind of Poisson batches without clipping or noise (the
    baseline of throughput ratios) and says so in the report."""
    cfg = TrainConfig(data_dir=str(data_dir), **dict(TINY, steps=2, private=False))
    result = run(cfg, tmp_path / "np")
    assert result["steps"] == 2
    report = json.loads((tmp_path / "np" / "privacy_report.json").read_text())
    assert report["private"] is False and report["epsilon"] is None


def test_train_under_torchrun_two_processes(data_dir, tmp_path):
    """`dpfast train` under torchrun (2 gloo processes): one set of outputs written by rank 0, and the
    same privacy accounting as a single-process run (the global sampling rate)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    args = ["--nf", "8", "--ch-mult", "1,2", "--num-res-blocks", "1", "--resolution", "8",
            "--batch-size", "12", "--steps", "3", "--max-physical-batch-size", "5", "--noise-multiplier", "1.0",
            "--accountant", "rdp", "--sample-steps", "2", "--grid-size", "2", "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dpfast",
           "train", "--preset", "demo", "--out", str(out), "--data-dir", str(data_dir), "--no-progress",
           "--num-classes", "3", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("finished.") == 1  # rank 0 alone reports
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["steps"] == 3 and report["sample_rate"] == pytest.approx(12 / 48)
    assert report["expected_batch_size"] == 12  # the divisor: the global batch, not world x it
    state = final_state(out)
    assert isinstance(state["loss_rng"], list) and len(state["loss_rng"]) == 2


def test_class_count_read_off_private_labels_is_refused(data_dir, tmp_path):
    """IDX files other than Fashion-MNIST say nothing about the number of classes; labels.max() + 1
    is a function of the private labels (one record with a new highest label would change the
    model's shape), so a private class-conditional run needs it declared."""
    cfg = TrainConfig(data_dir=str(data_dir), **dict(TINY, num_classes=None))
    with pytest.raises(ValueError, match="read off its labels.*--num-classes"):
        run(cfg, tmp_path / "c")
    with pytest.raises(ValueError, match=r"labels of .* must lie in \[0, 2\)"):
        run(TrainConfig(data_dir=str(data_dir), **dict(TINY, num_classes=2)), tmp_path / "d")
    assert not (tmp_path / "c" / "checkpoint.pt").exists()
    run(TrainConfig(data_dir=str(data_dir), **dict(TINY, num_classes=None, class_conditional=False, steps=1)),
        tmp_path / "e")


def test_bad_options_are_one_line_errors_before_anything_runs(tmp_path, capsys):
    from dpfast.diffusion.cli import main

    for argv, msg in ((["--sampler", "foo"], "--sampler must be one of ddim, edm"),
                      (["--mode", "twopass"], "--mode must be one of bk, two-pass"),
                      (["--noise-multiplier", "-1"], "--noise-multiplier must be > 0"),
                      (["--target-epsilon", "-3"], "--target-epsilon must be > 0"),
                      (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
                      (["--delta", "2"], "--delta must be in (0, 1)"),
                      (["--recipe", "magic"], "--recipe must be one of")):
        assert main(["train", "--out", str(tmp_path / "o"), "--no-progress", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dpfast train: ") and msg in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()


def test_a_finished_run_is_a_no_op(data_dir, tmp_path):
    cfg = TrainConfig(data_dir=str(data_dir), **dict(TINY, steps=2))
    run(cfg, tmp_path / "f")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "f").iterdir() if p.is_file()}
    again = run(cfg, tmp_path / "f")
    assert again["status"] == "finished" and again["steps"] == 2
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "f").iterdir() if p.is_file()}
    assert after == before        # nothing rewritten: the privacy report keeps its epsilon


def test_one_process_per_output_directory(data_dir, tmp_path):
    """A second process resuming the same checkpoint would release the same noise keys on other
    batches: the output directory is locked while a run trains in it."""
    from dpfast.diffusion.presets import ConfigError
    from dpfast.diffusion.trainer import OutLock, Trainer

    cfg = TrainConfig(data_dir=str(data_dir), **dict(TINY, steps=1))
    (tmp_path / "l").mkdir()
    held = OutLock(tmp_path / "l")
    with pytest.raises(ConfigError, match="another process is training"):
        Trainer(cfg, tmp_path / "l", progress=False, log=lambda *a: None)
    held.release()
    assert run(cfg, tmp_path / "l")["steps"] == 1
    assert run(cfg, tmp_path / "l")["status"] == "finished"   # the lock is free again after a run


def test_sample_and_evaluate_bad_paths_are_one_line_errors(tmp_path, capsys):
    from dpfast.diffusion.cli import main

    assert main(["sample", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "s.npz")]) == 2
    assert capsys.readouterr().err.startswith("dpfast sample: no model at")
    for target in (tmp_path / "missing.npz", tmp_path):
        assert main(["evaluate", "--samples", str(target)]) == 2
        assert "is not a file" in capsys.readouterr().err
