"""Runs made of phases (public pre-training, then private fine-tuning), trainable selections, LoRA,
--init-from, the public data sources, and DP-LDM's autoencoder."""
import copy
import json

import pytest
import torch

from dpfast import PrivacyEngine
from dpfast.diffusion.data import ImageDataset, load_dataset
from dpfast.diffusion.presets import ConfigError, TrainConfig

from oracle import clipped_sum_oracle

from .test_data import write_mnist_dir
from .test_trainer import TINY, assert_same_run, final_state, run

PHASED = dict(TINY, pretrain_steps=3, steps=3, public_data="digits", checkpoint_every=1, num_classes=10)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_mnist_dir(tmp_path_factory.mktemp("data") / "idx", n=48, size=8, classes=3)


class Poisoned(ImageDataset):
    """A private set whose images may not be read: any item access raises."""
    armed = True

    def __getitem__(self, i):
        if Poisoned.armed:
            raise AssertionError("a public phase read the private data")
        return super().__getitem__(i)


def _poisoned(data_dir):
    d = load_dataset(data_dir, "train")
    return Poisoned(d.images, d.labels, 3, d.name)


def test_public_phase_never_reads_the_private_set(data_dir, tmp_path):
    cfg = TrainConfig(data_dir=str(data_dir), **PHASED)
    from dpfast.diffusion.trainer import Trainer

    Poisoned.armed = True
    out = tmp_path / "run"
    result = Trainer(cfg.replace(max_steps=3), out, dataset=_poisoned(data_dir), progress=False,
                     log=lambda *a: None).train()
    report = result["report"]
    assert result["steps"] == 3 and report["epsilon"] == 0.0 and report["steps"] == 0
    assert [p["epsilon"] for p in report["phases"]] == [0.0, 0.0]
    assert not (out / "privacy_ledger.jsonl").exists() or not (out / "privacy_ledger.jsonl").read_text().strip()
    # the private phase does read it, through the engine only
    Poisoned.armed = False
    result = Trainer(cfg, out, dataset=_poisoned(data_dir), progress=False, log=lambda *a: None).train()
    assert result["report"]["steps"] == 3 and result["report"]["epsilon"] > 0


def test_phase_accounting_is_the_private_phases_alone(data_dir, tmp_path):
    from dpfast.accounting import compute_epsilon

    cfg = TrainConfig(data_dir=str(data_dir), **PHASED)
    report = run(cfg, tmp_path / "run")["report"]
    alone = compute_epsilon(1.0, 12 / 48, 3, cfg.delta, accountant="rdp")
    assert report["epsilon"] == pytest.approx(alone, rel=1e-12)
    assert report["steps"] == 3 and report["releases_charged"] == 3 and report["total_steps"] == 6
    names = [(p["name"], p["private"], p["steps_done"]) for p in report["phases"]]
    assert names == [("pretrain", False, 3), ("private-fine-tune", True, 3)]
    assert report["phases"][0]["epsilon"] == 0.0
    assert report["phases"][1]["epsilon"] == pytest.approx(report["epsilon"], rel=1e-12)
    assert "digits" in report["public_data"]


@pytest.mark.parametrize("stop", [2, 3, 4])   # inside the public phase, at the boundary, inside the private one
def test_resume_across_a_phase_boundary_is_bit_exact(data_dir, tmp_path, stop):
    cfg = TrainConfig(data_dir=str(data_dir), **PHASED)
    run(cfg, tmp_path / "full")
    part = tmp_path / "part"
    assert run(cfg.replace(max_steps=stop), part)["steps"] == stop
    saved = final_state(part)
    assert saved["phase"] == (0 if stop <= 3 else 1)
    run(cfg.replace(deterministic_resume=True), part)  # compared with the uninterrupted run
    assert_same_run(final_state(tmp_path / "full"), final_state(part))


def _private_model_dir(data_dir, tmp_path):
    out = tmp_path / "private"
    run(TrainConfig(data_dir=str(data_dir), **dict(TINY, steps=1, num_classes=10)), out)
    return out


def test_init_from_checks(data_dir, tmp_path):
    pre = tmp_path / "pre"
    base = TrainConfig(data_dir=str(data_dir), **dict(TINY, num_classes=10))
    run(base.replace(recipe="pretrain", resolution=8, steps=2, public_data="digits", private=False), pre)
    meta = torch.load(pre / "model.pt", weights_only=False)
    assert meta["public_only"] and "digits" in meta["public_data"]
    # fine-tuning starts from the pre-trained EMA weights
    from dpfast.diffusion.trainer import Trainer

    t = Trainer(base.replace(init_from=str(pre)), tmp_path / "ft", progress=False, log=lambda *a: None)
    for k, v in meta["ema"].items():
        assert torch.equal(t.denoiser.state_dict()[k], v), k
    t.lock.release()
    with pytest.raises(ConfigError, match="architecture differs"):
        run(base.replace(init_from=str(pre), nf=16), tmp_path / "bad")
    with pytest.raises(ConfigError, match="trained on private data"):
        run(base.replace(init_from=str(_private_model_dir(data_dir, tmp_path))), tmp_path / "bad2")
    with pytest.raises(ConfigError, match="no such built-in"):
        run(base.replace(init_from="builtin:nope"), tmp_path / "bad3")
    with pytest.raises(ConfigError, match="built-in name"):
        run(base.replace(init_from="builtin:../pretrained/demo14"), tmp_path / "bad4")


def test_private_data_never_passes_as_public_data(data_dir, tmp_path):
    """The review's two launderings: the private folder pre-trained on as 'public' data while the
    pretrain run's own private directory is another one, and a private model's samples used as public
    data. Both refused, before any training."""
    import shutil

    import numpy as np

    from dpfast.diffusion.public import load_public

    base = TrainConfig(data_dir=str(data_dir), **dict(TINY, num_classes=10))
    pre = tmp_path / "pre"
    other = write_mnist_dir(tmp_path / "elsewhere", n=48, size=8, classes=3, seed=3)
    run(base.replace(recipe="pretrain", resolution=8, steps=1, public_data=str(data_dir), data_dir=str(other),
                     private=False), pre)
    with pytest.raises(ConfigError, match="overlaps this run's private data"):
        run(base.replace(init_from=str(pre)), tmp_path / "ft")
    # samples of a model (dpfast sample writes the mark), and anything inside a run directory
    from dpfast.diffusion.cli import main as cli

    private_run = _private_model_dir(data_dir, tmp_path)
    samples = tmp_path / "samples.npz"
    assert cli(["sample", "--model", str(private_run), "--num", "4", "--out", str(samples), "--steps", "2",
                "--no-progress"]) == 0
    with pytest.raises(ValueError, match="samples of a dpfast model"):
        load_public(str(samples), (1, 8, 8), private_dir=str(other))
    inside = private_run / "public.npz"
    with np.load(samples) as f:
        np.savez(inside, images=f["images"])
    with pytest.raises(ValueError, match="output of a dpfast run"):
        load_public(str(inside), (1, 8, 8), private_dir=str(other))
    plain = tmp_path / "plain" / "public.npz"
    plain.parent.mkdir()
    shutil.copyfile(inside, plain)
    assert len(load_public(str(plain), (1, 8, 8), private_dir=str(other))) == 4
    with pytest.raises(ValueError, match="contains"):          # a folder holding run directories
        load_public(str(tmp_path), (1, 8, 8), private_dir=None)


def test_builtin_checkpoint_loads_into_the_demo_and_lora_presets(tmp_path):
    from dpfast.diffusion.finetune import load_pretrained
    from dpfast.diffusion.presets import PRESETS
    from dpfast.diffusion.trainer import build_denoiser

    state = load_pretrained("builtin:demo14")
    assert state["public_only"] and state["num_classes"] == 10 and tuple(state["image_shape"]) == (1, 14, 14)
    for name in ("demo-pretrained", "dp-diffusion-demo", "dp-lora-demo"):
        from dpfast.diffusion.finetune import check_compatible, load_base_weights

        cfg = PRESETS[name]
        check_compatible(state, cfg, (1, 14, 14), 10, cfg.init_from)
        load_base_weights(build_denoiser(cfg, (1, 14, 14), 10), state["ema"], cfg.init_from)


def _edm_rows(K):
    """EDM loss rows with the noise levels and noise given as inputs (sample-major)."""
    from dpfast.diffusion.edm import edm_loss_weight

    def rows(model, x, y, sigma, noise):
        xr = x.repeat_interleave(K, 0)
        sig = sigma.flatten().reshape(-1, 1, 1, 1)
        out = model(xr + sig * noise.flatten(0, 1), sigma.flatten(), y.repeat_interleave(K, 0))
        return (edm_loss_weight(sig) * (out - xr) ** 2).flatten(1).mean(1)
    return rows


@pytest.mark.parametrize("spec", ["attention", "lora:2", "lora:2+conv", r"re:^net\.up\."])
def test_a_frozen_parameter_step_clips_exactly_over_the_trainable_subset(spec):
    from dpfast.diffusion.finetune import select_trainable
    from dpfast.diffusion.trainer import build_denoiser

    cfg = TrainConfig(**dict(TINY, trainable=spec))
    torch.manual_seed(0)
    model = build_denoiser(cfg, (1, 8, 8), 3).double()
    for n, p in model.named_parameters():           # adapters start at zero: give them a value
        if "lora_up" in n:
            torch.nn.init.normal_(p, std=0.1)
    names = select_trainable(model, spec)
    assert 0 < len(names) < len(list(model.parameters()))
    K, B = 2, 3
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (B,), generator=g)
    sigma = torch.exp(torch.randn(B, K, generator=g, dtype=torch.float64) - 1)
    noise = torch.randn(B, K, 1, 8, 8, generator=g, dtype=torch.float64)
    inputs = (x, y, sigma, noise)
    rows_fn = _edm_rows(K)
    _, norms = clipped_sum_oracle(model, rows_fn, inputs, K, C=1e9)
    C = norms.median().item()
    want, _ = clipped_sum_oracle(model, rows_fn, inputs, K, C)
    m = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    engine = PrivacyEngine(accountant="rdp", seed=0)
    m, o, _ = engine.make_private(module=m, optimizer=torch.optim.SGD([p for p in m.parameters() if p.requires_grad],
                                                                      lr=1.0),
                                  noise_multiplier=0.0, max_grad_norm=C, multiplicity=K, expected_batch_size=B,
                                  backend="torch")
    rows_fn(m, *inputs).mean().backward()
    o.step()
    torch.testing.assert_close(o.last_norms, norms, rtol=1e-9, atol=0)
    for n, p in m._module.named_parameters() if hasattr(m, "_module") else m.named_parameters():
        got = before[n] - p.detach()
        if n in names:
            torch.testing.assert_close(got, want[n] / B, rtol=1e-8, atol=1e-12)
        else:
            assert torch.equal(got, torch.zeros_like(got)), f"frozen {n} moved"


def test_peft_lora_on_a_diffusers_unet_is_exact():
    peft = pytest.importorskip("peft")
    from test_diffusers_unets import _inputs, rows_unet2d, tiny_unet2d

    model = tiny_unet2d()
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v",
                                                                                          "to_out.0", "conv1"],
                                                       init_lora_weights="gaussian"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    K = 2
    rows_fn = rows_unet2d(K)
    inputs = _inputs(3, False, K)
    _, norms = clipped_sum_oracle(model, rows_fn, inputs, K, C=1e9)
    C = norms.median().item()
    want, _ = clipped_sum_oracle(model, rows_fn, inputs, K, C)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = PrivacyEngine(accountant="rdp", seed=0)
    m, o, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=1.0), noise_multiplier=0.0, max_grad_norm=C,
        multiplicity=K, expected_batch_size=3, backend="torch")
    rows_fn(m, *inputs).mean().backward()
    o.step()
    torch.testing.assert_close(o.last_norms, norms, rtol=1e-9, atol=0)
    for n, p in model.named_parameters():
        got = before[n] - p.detach()
        if n in want:
            torch.testing.assert_close(got, want[n] / 3, rtol=1e-8, atol=1e-12)
        else:
            assert torch.equal(got, torch.zeros_like(got)), n


def test_trainable_selection_errors():
    from dpfast.diffusion.finetune import add_lora, parse_trainable, select_trainable
    from dpfast.diffusion.trainer import build_denoiser

    for bad in ("lora", "lora:0", "lora:x", "re:(", "heads"):
        with pytest.raises(ConfigError):
            parse_trainable(bad)
    class NoAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3)
    with pytest.raises(ConfigError, match="no attention"):
        add_lora(NoAttention(), 2)
    with pytest.raises(ConfigError, match="selects no parameter"):
        select_trainable(build_denoiser(TrainConfig(**TINY), (1, 8, 8), 3), "re:^nothing$")
    with pytest.raises(ConfigError):
        TrainConfig(sigma_range="2,1").validate()
    with pytest.raises(ConfigError):
        TrainConfig(sigma_bias="0.1,1,2").validate()


def test_public_sources_are_deterministic_and_never_read_the_private_data(monkeypatch):
    from dpfast.diffusion import data as data_module
    from dpfast.diffusion.public import dead_leaves, load_public

    def refuse(*a, **k):
        raise AssertionError("a public source opened a data set")
    monkeypatch.setattr(data_module, "load_dataset", refuse)
    monkeypatch.setattr("dpfast.diffusion.public.load_dataset", refuse)
    a = load_public("digits+photos+faces+dead-leaves", (1, 14, 14))
    b = load_public("digits+photos+faces+dead-leaves", (1, 14, 14))
    assert torch.equal(a.images, b.images) and len(a) == 1797 + 2000 + 400 + 2000
    assert a.num_classes == 10 and int((a.labels == -1).sum()) == 4400
    leaves = dead_leaves(4, (3, 32, 32), seed=5)
    assert leaves.shape == (4, 3, 32, 32) and leaves.dtype == torch.uint8
    assert torch.equal(leaves, dead_leaves(4, (3, 32, 32), seed=5))
    assert not torch.equal(leaves, dead_leaves(4, (3, 32, 32), seed=6))


def test_ldm_autoencoder_round_trips_fashion_mnist_within_its_stated_error():
    """The autoencoder of dp-ldm, trained on public data only, reconstructs the real test images
    with a mean squared error below 0.04 (pixels in [-1, 1]) after 300 steps (the preset's 1500: see
    the README)."""
    from dpfast.diffusion.public import load_public
    from dpfast.recipes.dp_ldm import train_autoencoder

    try:
        test = load_dataset(None, "test").subset(1000).downsample(14)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")
    ae = train_autoencoder(load_public("digits+photos+faces+dead-leaves", (1, 14, 14)), 3, 300, seed=0,
                           log=lambda *a: None)
    x = test.images.float() / 127.5 - 1
    with torch.no_grad():
        err = torch.nn.functional.mse_loss(ae.decode(ae.encode(x)), x).item()
    assert err < 0.04, err


def test_ldm_run_accounts_only_its_private_phase_and_samples_pixels(data_dir, tmp_path):
    from dpfast.diffusion.trainer import load_sampler

    cfg = TrainConfig(data_dir=str(data_dir), **dict(
        TINY, num_classes=10, recipe="dp-ldm", resolution=8, ch_mult=(1,), attn_resolutions=(4,), pretrain_steps=2, steps=2,
        trainable="attention", public_data="digits", ldm_autoencoder_steps=5, ldm_latent_channels=2))
    from dpfast.diffusion.trainer import train

    quiet = dict(progress=False, log=lambda *a: None)
    report = train(cfg, tmp_path / "ldm", **quiet)["report"]
    assert [(p["name"], p["epsilon"] == 0.0) for p in report["phases"]] == [
        ("autoencoder", True), ("pretrain", True), ("private-fine-tune", False)]
    assert report["steps"] == 2 and report["trainable"] == "attention"
    ae_before = (tmp_path / "ldm" / "autoencoder.pt").read_bytes()
    draw, meta = load_sampler(tmp_path / "ldm")
    assert meta["kind"] == "latent-diffusion" and meta["image_shape"] == (1, 8, 8)
    x = draw(3, torch.tensor([0, 1, 2]), seed=0, num_steps=2)
    assert x.shape == (3, 1, 8, 8) and x.abs().max() <= 1
    draw, meta = load_sampler(tmp_path / "ldm" / "checkpoint.pt")   # a stopped run: decoded all the same
    assert draw(2, torch.tensor([0, 1]), seed=0, num_steps=2).shape == (2, 1, 8, 8)
    # the autoencoder is a function of the public data and the seed: another private set, the same bytes
    other = write_mnist_dir(tmp_path / "other", n=48, size=8, classes=3, seed=9)
    train(cfg.replace(data_dir=str(other)), tmp_path / "ldm2", **quiet)
    assert (tmp_path / "ldm2" / "autoencoder.pt").read_bytes() == ae_before
    json.dumps(report)


def test_cli_pretrain_then_train_init_from(data_dir, tmp_path, capsys):
    from dpfast.cli import main

    pre = tmp_path / "pre"
    assert main(["pretrain", "--out", str(pre), "--steps", "2", "--resolution", "8", "--nf", "8",
                 "--public-data", "digits+dead-leaves", "--no-progress"]) == 0
    report = json.loads((pre / "privacy_report.json").read_text())
    assert report["private_data_used"] is False and report["epsilon"] is None and report["steps"] == 2
    assert main(["pretrain", "--out", str(tmp_path / "x"), "--recipe", "dpdm", "--no-progress"]) == 2
    assert main(["train", "--out", str(tmp_path / "ft"), "--data-dir", str(data_dir), "--init-from", str(pre),
                 "--resolution", "8", "--nf", "8", "--steps", "1", "--trainable", "lora:2", "--num-classes", "10",
                 "--no-progress"]) == 0
    report = json.loads((tmp_path / "ft" / "privacy_report.json").read_text())
    assert report["init"]["private_data_used"] is False and report["trainable"] == "lora:2"
    assert 0 < report["trainable_parameters"] < 10_000
    assert main(["train", "--out", str(tmp_path / "bad"), "--data-dir", str(data_dir), "--init-from", str(pre),
                 "--resolution", "8", "--nf", "16", "--steps", "1", "--num-classes", "10", "--no-progress"]) == 2
    assert "architecture differs" in capsys.readouterr().err
