"""DP-SynGen: the generators, the stage threshold, the phases of a dp-syngen run, its accounting, the
stage expert (a function of public objects only) and the switching sampler."""
import builtins
import json
import math

import numpy as np
import pytest
import torch

from dpfast.diffusion.presets import PRESETS, ConfigError, TrainConfig

from .test_data import write_mnist_dir
from .test_phases import Poisoned, _poisoned
from .test_trainer import TINY, assert_same_run, final_state

SYNGEN = dict(TINY, recipe="dp-syngen", syngen="cleaning", pretrain_steps=3, steps=3, public_data="dead-leaves:40",
              checkpoint_every=1)


def trainer(cfg, out, **kw):
    from dpfast.diffusion.trainer import trainer_class

    return trainer_class(cfg)(cfg, out, progress=False, log=lambda *a: None, **kw)


def run(cfg, out, **kw):
    return trainer(cfg, out, **kw).train()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_mnist_dir(tmp_path_factory.mktemp("sdata") / "idx", n=48, size=8, classes=3)


# ----------------------------------------------------------------------------- generators
@pytest.mark.parametrize("name", ["dead-leaves", "fractal", "strokes"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 17, 11), (1, 28, 28)])
def test_generators_are_deterministic_at_any_shape(name, shape):
    from dpfast.diffusion.synthetic import GENERATORS

    fn = GENERATORS[name][0]
    a = fn(6, shape, seed=3)
    assert a.shape == (6, *shape) and a.dtype == torch.uint8
    assert torch.equal(a, fn(6, shape, seed=3))
    assert not torch.equal(a, fn(6, shape, seed=4))
    per_image = a.flatten(1).float().std(dim=1)
    assert (per_image > 5).float().mean() >= 0.5        # structure, not flat images
    assert a.min() < 60 and a.max() > 190               # most of the grey range


def test_generators_read_no_file(monkeypatch):
    """Generated public data depends on the seed only: with every way to open a file disabled, the
    sources still load (so they cannot read the private data, or anything else)."""
    from dpfast.diffusion import public

    def refuse(*a, **k):
        raise AssertionError(f"a generator opened a file: {a[:1]}")
    for target, name in ((builtins, "open"), (np, "load"), (torch, "load"), (public, "load_dataset")):
        monkeypatch.setattr(target, name, refuse)
    monkeypatch.setattr("os.open", refuse)
    data = public.load_public("dead-leaves:30+fractal:30+strokes:30", (1, 12, 12), private_dir="/nonexistent")
    assert len(data) == 90 and (data.labels == -1).all()
    assert "generated" in data.name and public.source_paths("dead-leaves:30+fractal") == []
    with pytest.raises(ValueError, match="integer in"):
        public.load_public("strokes:0", (1, 8, 8))


# ----------------------------------------------------------------------------- the threshold
def test_kneedle_finds_known_elbows():
    from dpfast.diffusion.syngen import kneedle

    x = torch.linspace(0, 1, 101, dtype=torch.float64)
    y = torch.where(x < 0.3, 1 - x / 0.3 * 0.9, 0.1 - (x - 0.3) / 0.7 * 0.1)   # a sharp bend at 0.3
    above, below = kneedle(x, y)
    assert x[below].item() == pytest.approx(0.3, abs=0.011)
    s = 1 / (1 + torch.exp(20 * (x - 0.5)))                                   # a falling S: two elbows
    hi, lo = kneedle(x, s)
    assert x[hi] < 0.5 < x[lo]


def test_thresholds_split_the_schedule_into_three_stages():
    from dpfast.diffusion.syngen import schedule_curves, stage_mass, thresholds

    th = thresholds()
    assert 0.002 < th["cleaning"] < 1 < th["coarse"] < 80          # SNR = 1 lies in the context stage
    assert th["alpha_bar_cleaning"] > 0.9 and th["alpha_bar_coarse"] < 0.1
    c = schedule_curves()
    assert (c["sigma"].diff() > 0).all() and c["sigma"][0] == pytest.approx(0.002) and c["sigma"][-1] == pytest.approx(80)
    shares = [stage_mass(0, th["cleaning"]), stage_mass(th["cleaning"], th["coarse"]), stage_mass(th["coarse"], math.inf)]
    assert sum(shares) == pytest.approx(1.0) and all(0 < s < 1 for s in shares)
    assert torch.allclose(c["snr"], c["alpha_bar"] / (1 - c["alpha_bar"]))     # DDPM's SNR
    # a longer schedule moves the coarse elbow up
    assert thresholds(sigma_max=160)["coarse"] > th["coarse"]


def test_cli_syngen_threshold(tmp_path, capsys):
    from dpfast.cli import main

    plot = tmp_path / "tau.png"
    assert main(["syngen-threshold", "--plot", str(plot), "--tau", "0.5"]) == 0
    assert plot.stat().st_size > 1000 and "tau_cleaning" in capsys.readouterr().out
    assert main(["syngen-threshold", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cleaning"] < out["coarse"] and sum(out["training_share"].values()) == pytest.approx(1.0)
    assert main(["syngen-threshold", "--sigma-min", "90"]) == 2
    assert "below --sigma-max" in capsys.readouterr().err


# ----------------------------------------------------------------------------- phases and config
def test_variants_plan_their_phases():
    from dpfast.diffusion.phases import plan_phases
    from dpfast.diffusion.syngen import thresholds

    th = thresholds()
    for variant, public_range, private_range in (
            ("coarse", (th["coarse"], math.inf), (0.0, th["coarse"])),
            ("cleaning", (0.0, th["cleaning"]), (th["cleaning"], math.inf)),
            ("finetune", None, None)):
        cfg = PRESETS[f"syngen-{variant}"].validate()
        public, private = plan_phases(cfg, 7)
        assert public.public and not public.private and public.steps == cfg.pretrain_steps
        assert public.data.startswith("dead-leaves") and private.data == "private" and private.private
        assert public.sigma_range == public_range and private.sigma_range == private_range and private.steps == 7
    cfg = PRESETS["syngen-cleaning"].replace(tau=0.5)
    assert plan_phases(cfg, 2)[1].sigma_range == (0.5, math.inf)
    assert plan_phases(cfg, 2)[0].to_dict()["sigma_range"] == [0.0, 0.5]
    assert plan_phases(cfg, 2)[1].to_dict()["sigma_range"] == [0.5, None]      # JSON: null is unbounded


@pytest.mark.parametrize("changes, message", [
    (dict(recipe="dp-syngen"), "needs --syngen"),
    (dict(recipe="dp-syngen", syngen="middle"), "needs --syngen"),
    (dict(recipe="dp-syngen", syngen="coarse", pretrain_steps=0), "pretrain-steps >= 1"),
    (dict(recipe="dp-syngen", syngen="coarse", pretrain_steps=2, sigma_range="0.1,1"), "drop --sigma-range"),
    (dict(syngen="coarse"), "belong to recipe dp-syngen"),
    (dict(tau=0.3), "belong to recipe dp-syngen"),
    (dict(recipe="dp-syngen", syngen="coarse", pretrain_steps=2, tau=-1.0), "--tau must be a noise level"),
])
def test_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes).validate()


# ----------------------------------------------------------------------------- runs
def test_a_syngen_run_accounts_only_its_private_phase(data_dir, tmp_path):
    from dpfast.accounting import compute_epsilon

    cfg = TrainConfig(data_dir=str(data_dir), **SYNGEN)
    report = run(cfg, tmp_path / "run")["report"]
    assert report["epsilon"] == pytest.approx(compute_epsilon(1.0, 12 / 48, 3, cfg.delta, accountant="rdp"), rel=1e-12)
    assert report["steps"] == 3 and report["releases_charged"] == 3 and report["total_steps"] == 6
    pub, priv = report["phases"]
    assert (pub["name"], pub["epsilon"], pub["steps_done"]) == ("synthetic-cleaning", 0.0, 3)
    assert priv["noise_multiplier"] == 1.0 and priv["steps"] == 3 and priv["sigma_range"][1] is None
    sg = report["syngen"]
    assert sg["variant"] == "cleaning" and sg["stage_experts"] and sg["tau_rule"] == "elbow"
    assert sg["experts"] == [{"phase": "synthetic-cleaning", "sigma_range": [0.0, sg["tau"]], "unconditional": True,
                              "private_data_used": False}]
    assert 0 < sg["private_share_of_noise_levels"] < 1
    json.dumps(report, allow_nan=False)                  # the report is strict JSON


def test_fewer_private_steps_calibrate_less_noise(data_dir, tmp_path):
    """At one target epsilon, a run whose private phase is shorter gets a smaller noise multiplier:
    the report shows sigma and steps per phase."""
    base = TrainConfig(data_dir=str(data_dir), **dict(SYNGEN, noise_multiplier=None, target_epsilon=8.0))
    sigmas = {}
    for steps in (2, 8):
        t = trainer(base.replace(steps=steps), tmp_path / f"s{steps}")
        rep = t.privacy_report()
        sigmas[steps] = rep["phases"][1]["noise_multiplier"]
        assert rep["phases"][1]["steps"] == steps and rep["phases"][0]["steps"] == 3
        t.lock.release()
    assert sigmas[2] < sigmas[8]


def test_public_phase_and_its_expert_never_depend_on_the_private_data(data_dir, tmp_path):
    """The public phase reads no private image (a poisoned set), and the expert it leaves is
    bit-identical when the private data set is another one."""
    cfg = TrainConfig(data_dir=str(data_dir), **SYNGEN)
    Poisoned.armed = True
    out = tmp_path / "poisoned"
    result = run(cfg.replace(max_steps=3), out, dataset=_poisoned(data_dir))
    assert result["steps"] == 3 and result["report"]["epsilon"] == 0.0
    Poisoned.armed = False
    run(cfg, out, dataset=_poisoned(data_dir))
    other_dir = write_mnist_dir(tmp_path / "other", n=48, size=8, classes=3, seed=99)
    run(cfg.replace(data_dir=str(other_dir)), tmp_path / "other-run")
    a = torch.load(out / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "other-run" / "model.pt", weights_only=True)
    assert len(a["experts"]) == 1
    for k, v in a["experts"][0]["ema"].items():
        assert torch.equal(v, b["experts"][0]["ema"][k]), k
    assert any(not torch.equal(v, b["ema"][k]) for k, v in a["ema"].items())   # the private models differ
    assert a["public_only"] is False


@pytest.mark.parametrize("stop", [2, 3, 4])  # inside the public phase, at the boundary, inside the private one
def test_resume_keeps_the_expert_bit_exact(data_dir, tmp_path, stop):
    cfg = TrainConfig(data_dir=str(data_dir), **SYNGEN)
    run(cfg, tmp_path / "full")
    part = tmp_path / "part"
    run(cfg.replace(max_steps=stop), part)
    run(cfg.replace(deterministic_resume=True), part)  # compared with the uninterrupted run
    full, resumed = final_state(tmp_path / "full"), final_state(part)
    assert_same_run(full, resumed)
    assert len(full["experts"]) == len(resumed["experts"]) == 1
    for k, v in full["experts"][0]["ema"].items():
        assert torch.equal(v, resumed["experts"][0]["ema"][k]), k


def test_sampler_switches_to_the_expert_at_tau(data_dir, tmp_path):
    from dpfast.diffusion.syngen import StageExperts
    from dpfast.diffusion.trainer import build_denoiser, load_denoiser, load_sampler

    cfg = TrainConfig(data_dir=str(data_dir), **SYNGEN)
    run(cfg, tmp_path / "run")
    staged, meta = load_denoiser(tmp_path / "run")
    assert isinstance(staged, StageExperts) and meta["experts"][0]["phase"] == "synthetic-cleaning"
    tau = cfg.tau_value()
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    main = build_denoiser(cfg, (1, 8, 8), 3)
    main.load_state_dict(state["ema"])
    expert = build_denoiser(cfg, (1, 8, 8), 3)
    expert.load_state_dict(state["experts"][0]["ema"])
    x = torch.randn(4, 1, 8, 8)
    sigma = torch.tensor([tau / 2, tau, tau * 1.01, 5.0])
    labels = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        got = staged(x, sigma, labels)
        null = torch.full((2,), 3)
        want_expert = expert.eval()(x[:2], sigma[:2], null)          # unconditional expert: the null label
        want_main = main.eval()(x[2:], sigma[2:], labels[2:])
    assert torch.allclose(got[:2], want_expert, atol=1e-6) and torch.allclose(got[2:], want_main, atol=1e-6)
    draw, meta = load_sampler(tmp_path / "run")
    images = draw(4, torch.arange(4) % 3, seed=0)
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()


def test_one_model_without_experts(data_dir, tmp_path):
    from dpfast.diffusion.syngen import StageExperts
    from dpfast.diffusion.trainer import load_denoiser

    cfg = TrainConfig(data_dir=str(data_dir), **dict(SYNGEN, stage_experts=False, syngen="coarse"))
    report = run(cfg, tmp_path / "run")["report"]
    assert report["syngen"]["experts"] == [] and not report["syngen"]["stage_experts"]
    assert not isinstance(load_denoiser(tmp_path / "run")[0], StageExperts)


def test_tau_is_fixed_in_the_checkpoint_and_a_changed_rule_is_refused(data_dir, tmp_path, monkeypatch):
    from dpfast.diffusion import syngen

    cfg = TrainConfig(data_dir=str(data_dir), **SYNGEN)
    out = tmp_path / "run"
    run(cfg.replace(max_steps=2), out)
    assert final_state(out)["config"]["tau"] == syngen.thresholds()["cleaning"]
    real = syngen.thresholds
    monkeypatch.setattr(syngen, "thresholds", lambda *a, **k: dict(real(*a, **k), cleaning=0.5))
    with pytest.raises(ConfigError, match="tau"):
        run(cfg, out)
    monkeypatch.setattr(syngen, "thresholds", real)
    assert run(cfg, out)["report"]["syngen"]["tau_rule"] == "elbow"


@pytest.mark.parametrize("changes, message", [
    (dict(public_data="private"), "never public data"),
    (dict(public_data="digits+private"), "never public data"),
    (dict(public_data="strokes:0"), "integer in"),
    (dict(recipe="dp-syngen", syngen="cleaning", pretrain_steps=2, tau=100.0), "inside the sampler's schedule"),
    (dict(recipe="dp-syngen", syngen="finetune", pretrain_steps=2, tau=0.3), "does not apply"),
])
def test_public_data_and_tau_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes).validate()


def test_a_private_run_never_has_a_non_dp_phase_on_the_private_data():
    """The review's finding: public_data 'private' made a phase that trained on the private data
    without DP while the report gave the private phase's epsilon. validate refuses the name, and
    plan_phases refuses any such phase whatever the config says."""
    from dpfast.diffusion.phases import plan_phases

    bad = PRESETS["syngen-cleaning"].replace(public_data="private")       # not validated: plan_phases checks on its own
    with pytest.raises(ValueError, match="only in its DP-SGD phase"):
        plan_phases(bad, 5)
    with pytest.raises(ValueError, match="only in its DP-SGD phase"):
        plan_phases(PRESETS["demo"].replace(pretrain_steps=3, public_data="private"), 5)
    plan_phases(PRESETS["demo"].replace(pretrain_steps=3, private=False, public_data="private"), 5)  # no DP claimed


def test_finetune_keeps_its_sigma_range():
    from dpfast.diffusion.phases import plan_phases

    public, private = plan_phases(PRESETS["syngen-finetune"].replace(sigma_range="0.1,1").validate(), 4)
    assert public.sigma_range is None and private.sigma_range == (0.1, 1.0)


# ----------------------------------------------------------------------------- the second review's findings
def test_public_links_into_the_private_data_are_refused(data_dir, tmp_path):
    """A folder of symbolic links to the private files (or a link to a folder that holds such links)
    overlaps the private data, though its own path does not."""
    from dpfast.diffusion.public import check_overlap, load_public

    links = tmp_path / "links"
    links.mkdir()
    for f in data_dir.iterdir():
        (links / f.name).symlink_to(f)
    with pytest.raises(ConfigError, match="through"):
        load_public(str(links), (1, 8, 8), private_dir=str(data_dir))
    outer = tmp_path / "outer"
    outer.mkdir()
    (outer / "inner").symlink_to(links, target_is_directory=True)
    with pytest.raises(ConfigError, match="through"):
        check_overlap(outer, data_dir)
    check_overlap(outer, tmp_path / "elsewhere")          # no private data there: nothing to refuse


def test_every_start_checks_the_public_paths_against_this_runs_private_data(data_dir, tmp_path):
    """Resuming with another --data-dir (which skips loading the public data again), or a run whose
    cached public model was trained on what is now the private data, is refused before any work."""
    from dpfast.recipes.dp_mepf import MEPFTrainer

    other = write_mnist_dir(tmp_path / "x", n=48, size=8, classes=3, seed=5)
    cfg = TrainConfig(data_dir=str(data_dir), **dict(SYNGEN, public_data=str(other)))
    out = tmp_path / "run"
    run(cfg.replace(max_steps=4), out)                   # inside the private phase
    with pytest.raises(ConfigError, match="overlaps the private data"):
        run(cfg.replace(data_dir=str(other)), out)
    with pytest.raises(ConfigError, match="overlaps the private data"):
        trainer(TrainConfig(data_dir=str(other), **dict(TINY, public_data=str(other))), tmp_path / "plain")
    mepf = TrainConfig(recipe="dp-mepf", steps=2, batch_size=8, nf=8, multiplicity=1, num_classes=3,
                       mepf_feature_steps=1, device="cpu", data_dir=str(other), public_data=str(other))
    with pytest.raises(ConfigError, match="overlaps the private data"):
        MEPFTrainer(mepf, tmp_path / "mepf", progress=False, log=lambda *a: None)
