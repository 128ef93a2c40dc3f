"""DP-MEPF: the release's sensitivity and noise, its accounting, that nothing after it reads the
private data, crash and resume behaviour, and sample/evaluate on its output."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dpfast.accounting import Accountant, calibrate_noise_multiplier, epsilon_report
from dpfast.diffusion.data import ImageDataset
from dpfast.diffusion.presets import TrainConfig, get_preset
from dpfast.recipes import dp_mepf as M

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "diffusion"))
from test_data import write_mnist_dir  # noqa: E402

TINY = TrainConfig(recipe="dp-mepf", steps=4, batch_size=12, nf=8, num_classes=4, lr=1e-3, ema_decay=0.9, multiplicity=1,
                   target_epsilon=5.0, accountant="rdp", device="cpu", grid_size=2, checkpoint_every=2,
                   mepf_feature_steps=3)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_mnist_dir(tmp_path_factory.mktemp("mdata") / "idx", n=40, size=8, classes=4)


def _fmap(channels=1, classes=4):
    torch.manual_seed(0)
    return M.FeatureMap(M.PublicCNN(channels, classes, width=4), M.PublicCNN.FEATURE_LAYERS)


def _data(n=24, classes=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageDataset(torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8),
                        torch.arange(n) % classes, classes)


@pytest.mark.parametrize("moments", M.MOMENTS)
def test_sensitivity_is_attained_and_never_exceeded(moments):
    """Removing any one record moves the released vector by at most sqrt(3) (sqrt(2) without second
    moments), and by exactly that for a record with a non-zero feature vector."""
    fmap, data = _fmap(), _data()
    full = torch.cat([t.flatten() for t in M.exact_sums(fmap, data, 4, moments) if t is not None])
    for i in range(len(data)):
        keep = torch.tensor([j for j in range(len(data)) if j != i])
        rest = ImageDataset(data.images[keep], data.labels[keep], 4)
        other = torch.cat([t.flatten() for t in M.exact_sums(fmap, rest, 4, moments) if t is not None])
        assert float((full - other).norm()) == pytest.approx(M.sensitivity(moments), abs=1e-9)
    assert M.sensitivity(moments) == math.sqrt(3.0 if moments == "mean+second" else 2.0)


def test_release_is_the_grid_plus_discrete_gaussian_noise_on_every_block():
    """Each block (sums, second-moment sums, counts) carries noise of std sigma * sqrt(3) on the grid;
    the counts too (the paper's exact counts would be a leak under add/remove)."""
    from dpfast import random_secure as rs

    fmap, data = _fmap(), _data(n=64)
    sums, second, counts = M.exact_sums(fmap, data, 4, "mean+second")
    sigma, key = 2.0, bytes(range(32))
    rel = M.release_embeddings(fmap, data, 4, "mean+second", noise_multiplier=sigma, key=key)
    std = sigma * math.sqrt(3.0)
    scale_s, grid_exp = rs.secure_grid(std)
    g = 2.0 ** grid_exp
    for noisy, exact in ((rel.sums, sums), (rel.second_sums, second)):
        noise = (noisy - exact).flatten()
        assert noise.std().item() == pytest.approx(std, rel=0.05) and abs(noise.mean().item()) < 0.2
    # the counts: (round(count / g) + k) * g, with k the key's last 4 integer draws
    n = rel.sums.numel() * 2 + 4
    k = M.integer_noise(n, key, scale_s)[-4:]
    assert torch.equal(rel.counts, (torch.round(counts / g) + k.double()) * g)
    assert (rel.counts - counts).abs().min() > 0          # noise on every count
    grid_units = torch.cat([rel.sums.flatten(), rel.counts]) / g
    assert torch.equal(grid_units, grid_units.round())    # every released value is on the grid
    again = M.release_embeddings(fmap, data, 4, "mean+second", noise_multiplier=sigma)  # a key from the OS
    assert not torch.equal(again.counts, rel.counts)
    assert rel.effective_noise_multiplier < sigma and rel.effective_noise_multiplier > 0.999 * sigma


def test_empty_data_and_non_finite_features_release_only_noise():
    fmap = _fmap()
    empty = ImageDataset(torch.zeros(0, 1, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), 4)
    sums, second, counts = M.exact_sums(fmap, empty, 4, "mean+second")
    assert sums.shape == (4, M.feature_dim(fmap, (1, 8, 8))) and float(counts.sum()) == 0 and float(sums.abs().sum()) == 0
    rel = M.release_embeddings(fmap, empty, 4, "mean+second", noise_multiplier=1.0)
    assert rel.sums.shape == sums.shape
    with torch.no_grad():
        fmap.net.b0[0].weight.fill_(float("nan"))
    sums, second, counts = M.exact_sums(fmap, _data(), 4, "mean+second")
    assert float(sums.abs().sum()) == 0 and float(counts.sum()) == 24   # zero vectors, counted


def test_one_shot_accounting_is_the_gaussian_mechanism():
    """The accountant's phase (sigma, q=1, 1 step) against the analytic Gaussian mechanism (Balle &
    Wang 2018): the calibrated sigma meets delta at epsilon, and 1% less noise does not. The recipe
    accounts with RDP (proven for the discrete Gaussian), which is above the tight value."""
    from scipy.stats import norm

    def delta(eps, s):  # sensitivity 1, std s
        return norm.cdf(-eps * s + 1 / (2 * s)) - math.exp(eps) * norm.cdf(-eps * s - 1 / (2 * s))
    for eps in (1.0, 10.0):
        s = calibrate_noise_multiplier(eps, 1e-5, 1.0, steps=1)
        assert delta(eps, s) <= 1e-5 and delta(eps, 0.99 * s) > 1e-5
        s_rdp = calibrate_noise_multiplier(eps, 1e-5, 1.0, steps=1, accountant="rdp")
        assert s_rdp > s and delta(eps, s_rdp) < 1e-5
    acc = Accountant.create("prv")
    acc.release(3.75)
    acc.step(0.7, 0.002, 600)
    both = acc.get_epsilon(1e-5)
    assert both > epsilon_report([(3.75, 1.0, 1)], 1e-5).epsilon
    assert both > epsilon_report([(0.7, 0.002, 600)], 1e-5).epsilon
    assert acc.history[0] == (3.75, 1.0, 1)


def test_a_changed_config_after_the_release_is_refused(data_dir, tmp_path):
    """The release's settings are fixed once it started: a rerun that would report a non-private
    release as private, or another epsilon, is refused (the report is built from the release)."""
    cfg = TINY.replace(data_dir=str(data_dir), private=False, target_epsilon=None)
    out = tmp_path / "r"
    M.MEPFTrainer(cfg.replace(max_steps=1), out, progress=False, log=lambda *a: None).train()
    (out / "checkpoint.pt").unlink()          # as if killed before its first checkpoint
    with pytest.raises(ValueError, match="different configuration.*private"):
        M.MEPFTrainer(cfg.replace(private=True, target_epsilon=1.0), out, progress=False, log=lambda *a: None).train()
    rep = M.MEPFTrainer(cfg, out, progress=False, log=lambda *a: None).train()["report"]
    assert rep["private"] is False and rep["epsilon"] is None


class CountingData(ImageDataset):
    """Counts every read of the private images or labels."""
    reads = 0

    def __init__(self, base: ImageDataset):
        super().__init__(base.images, base.labels, base.num_classes, base.name)

    def __getattribute__(self, name):
        if name in ("images", "labels"):
            CountingData.reads += 1
        return super().__getattribute__(name)


def test_the_generator_never_reads_the_private_data(data_dir, tmp_path, monkeypatch):
    from dpfast.diffusion.data import load_dataset

    data = CountingData(load_dataset(data_dir, "train"))
    trainer = M.MEPFTrainer(TINY.replace(data_dir=str(data_dir)), tmp_path / "r", dataset=data,
                            progress=False, log=lambda *a: None)
    original = M.matching_loss
    after_release = []

    def spy(*a, **k):
        after_release.append(CountingData.reads)
        return original(*a, **k)
    monkeypatch.setattr(M, "matching_loss", spy)
    result = trainer.train()
    assert result["steps"] == 4 and len(after_release) == 4
    assert len(set(after_release)) == 1 and after_release[0] > 0   # read by the release, then never again
    assert trainer.dataset is None
    report = result["report"]
    assert report["epsilon"] <= 5.0 * (1 + 1e-9) and report["end_to_end"] and report["releases_charged"] == 1
    assert report["sensitivity"] == pytest.approx(math.sqrt(3))
    stored = torch.load(tmp_path / "r" / "embeddings.pt", weights_only=False)
    assert report["noise_multiplier"] == stored["noise_multiplier"] and report["history"][0][0] == stored[
        "effective_noise_multiplier"]
    assert "dataset_size" not in report      # the exact N is private under add/remove


def test_resume_reuses_the_release_and_a_lost_release_is_refused(data_dir, tmp_path, monkeypatch):
    cfg = TINY.replace(data_dir=str(data_dir))
    out = tmp_path / "r"
    first = M.MEPFTrainer(cfg.replace(max_steps=2), out, progress=False, log=lambda *a: None).train()
    assert first["steps"] == 2 and "stopped" in first["status"]
    saved = torch.load(out / "embeddings.pt", weights_only=False)

    def no_second_release(*a, **k):
        raise AssertionError("released twice")
    monkeypatch.setattr(M, "release_embeddings", no_second_release)
    done = M.MEPFTrainer(cfg, out, progress=False, log=lambda *a: None).train()
    assert done["steps"] == 4 and done["status"] == "finished"
    assert torch.equal(torch.load(out / "embeddings.pt", weights_only=False)["counts"], saved["counts"])

    lost = tmp_path / "lost"
    lost.mkdir()
    (lost / "release_started.json").write_text("{}")
    with pytest.raises(RuntimeError, match="privacy is spent"):
        M.MEPFTrainer(cfg, lost, progress=False, log=lambda *a: None).train()


def test_cli_train_sample_evaluate_and_public_data_checks(data_dir, tmp_path):
    from dpfast.diffusion.cli import main
    from dpfast.diffusion.public import load_public

    out = tmp_path / "cli"
    assert main(["train", "--preset", "dp-mepf-eps10", "--out", str(out), "--data-dir", str(data_dir),
                 "--no-progress", "--steps", "3", "--nf", "8", "--batch-size", "8", "--mepf-feature-steps", "2",
                 "--device", "cpu", "--grid-size", "2", "--mepf-moments", "mean", "--num-classes", "4"]) == 0
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["sensitivity"] == pytest.approx(math.sqrt(2)) and report["epsilon"] <= 10.0 * (1 + 1e-9)
    samples = tmp_path / "s.npz"
    assert main(["sample", "--model", str(out), "--num", "20", "--out", str(samples), "--device", "cpu"]) == 0
    with np.load(samples) as f:
        assert f["images"].shape == (20, 1, 8, 8) and f["labels"].tolist() == [i % 4 for i in range(20)]
    rep = tmp_path / "e.json"
    assert main(["evaluate", "--samples", str(samples), "--data-dir", str(data_dir), "--epochs", "1",
                 "--feature-steps", "2", "--feature-cache", str(tmp_path / "f.pt"), "--no-progress",
                 "--out", str(rep)]) == 0
    assert 0 <= json.loads(rep.read_text())["downstream"]["20"]["test_accuracy"] <= 1

    digits = load_public("digits", (1, 14, 14))
    assert digits.images.shape == (1797, 1, 14, 14) and digits.num_classes == 10
    assert load_public("digits", (3, 8, 8)).images.shape == (1797, 3, 8, 8)
    with pytest.raises(ValueError, match="never be a split of the private data"):
        load_public(str(data_dir), (1, 8, 8), private_dir=data_dir)
    with pytest.raises(FileNotFoundError, match="no such path"):
        load_public(str(tmp_path / "nothing"), (1, 8, 8))


def test_presets_and_config_errors(data_dir, tmp_path):
    cfg = get_preset("dp-mepf-eps1")
    assert (cfg.recipe, cfg.target_epsilon, cfg.mepf_moments) == ("dp-mepf", 1.0, "mean+second")
    with pytest.raises(ValueError, match="mepf_moments"):
        M.MEPFTrainer(TINY.replace(data_dir=str(data_dir), mepf_moments="third"), tmp_path / "x")
    with pytest.raises(ValueError, match="needs --steps"):
        M.MEPFTrainer(TINY.replace(data_dir=str(data_dir), steps=None), tmp_path / "y")
    from dpfast.diffusion.trainer import trainer_class
    with pytest.raises(ValueError, match="unknown recipe"):
        trainer_class(TINY.replace(recipe="dp-magic"))


def test_a_user_feature_map_plugs_in(data_dir, tmp_path):
    """Any nn.Module and layer names (a torchvision VGG with its own weights, here a small Sequential)."""
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU())
    fmap = M.FeatureMap(net, ["1", "3"])
    result = M.MEPFTrainer(TINY.replace(data_dir=str(data_dir)), tmp_path / "u", progress=False,
                           log=lambda *a: None, feature_map=fmap).train()
    assert result["status"] == "finished" and "user-supplied" in result["report"]["feature_network"]
    assert not (tmp_path / "u" / "feature_net.pt").exists()
    with pytest.raises(ValueError, match="not modules"):
        M.FeatureMap(net, ["nope"])


def test_a_pinned_noise_seed_stays_out_of_the_released_files(data_dir, tmp_path):
    """model.pt, release_started.json and embeddings.pt hold public_config (as config.json): a pinned
    --noise-seed is withheld there, kept in the checkpoint only, and a resume with it still works (also
    from the release marker alone)."""
    cfg = TINY.replace(data_dir=str(data_dir), noise_seed=4321)
    out = tmp_path / "r"
    M.MEPFTrainer(cfg.replace(max_steps=2), out, progress=False, log=lambda *a: None).train()
    assert json.loads((out / "release_started.json").read_text())["config"]["noise_seed"] is None
    assert torch.load(out / "embeddings.pt", weights_only=False)["config"]["noise_seed"] is None
    assert torch.load(out / "checkpoint.pt", weights_only=False)["config"]["noise_seed"] == 4321
    (out / "checkpoint.pt").unlink()          # resumed from the release marker's config
    done = M.MEPFTrainer(cfg, out, progress=False, log=lambda *a: None).train()
    assert done["status"] == "finished"
    for name in ("model.pt", "embeddings.pt"):
        assert torch.load(out / name, weights_only=False)["config"]["noise_seed"] is None, name
    for name in ("release_started.json", "config.json"):
        text = (out / name).read_text()
        assert "4321" not in text, name
    assert json.loads((out / "config.json").read_text())["noise_seed"] is None
    assert torch.load(out / "checkpoint.pt", weights_only=False)["config"]["noise_seed"] == 4321
