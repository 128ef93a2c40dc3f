"""DP-SAD (dpfast.recipes.dp_sad): every path from the private data to the released student is
accounted. The teacher's DP-SGD is composed into the student's epsilon; the discriminator is trained
inside the student's release (clipped with it, noised once); the paper's setting says it is not
differentially private; a resumed student is the uninterrupted one and refuses a teacher it was not composed with."""
import json
import math

import pytest
import torch

from dpfast.accounting import epsilon_report
from dpfast.diffusion.presets import PRESETS, ConfigError, TrainConfig

from .test_data import write_mnist_dir
from .test_trainer import TINY, assert_same_run, final_state

SAD = dict(TINY, recipe="dp-sad", sad_teacher_steps=3, steps=3, sad_teacher_nf=8, sad_disc_nf=4, checkpoint_every=1)


def run(cfg, out, lines=None, **kw):
    """``lines``: a list that gets every log line."""
    from dpfast.diffusion.trainer import train

    log = (lambda *a, **k: lines.append(" ".join(map(str, a)))) if lines is not None else (lambda *a, **k: None)
    return train(cfg, out, progress=False, log=log, **kw)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_mnist_dir(tmp_path_factory.mktemp("sad") / "idx", n=48, size=8, classes=3)


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sadrun") / "run"
    lines = []
    result = run(TrainConfig(**SAD, data_dir=str(data_dir)), out, lines)
    return out, dict(result, log=lines)


def test_epsilon_is_the_teacher_and_the_student_composed(finished):
    out, result = finished
    report = json.loads((out / "privacy_report.json").read_text())
    teacher = json.loads((out / "teacher" / "privacy_report.json").read_text())
    assert result["status"] == "finished" and report["end_to_end"] is True and teacher["private"] is True
    assert teacher["steps"] == 3 and report["steps"] == 3 and report["releases_charged"] == 3
    q = report["sample_rate"]
    expected = epsilon_report([(1.0, q, 3), (1.0, q, 3)], 1e-5, "rdp").epsilon
    assert report["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert report["sad"]["teacher"]["epsilon"] == pytest.approx(teacher["epsilon"], rel=1e-12)
    assert report["sad"]["student"]["epsilon_alone"] == pytest.approx(teacher["epsilon"], rel=1e-12)  # same sigma, q, steps
    assert report["epsilon"] > teacher["epsilon"]
    assert report["private"] is True and report["guarantee_lost"] is None
    assert "epsilon_if_teacher_were_public" not in report
    assert result["log"][-2].startswith(f"finished. epsilon spent: {report['epsilon']:.4g} at delta=1e-05")
    assert [p["name"] for p in report["phases"]] == ["teacher", "student"]
    # two engines, two seeds (a pinned --noise-seed is moved for the teacher), two ledgers
    s, t = final_state(out), final_state(out / "teacher")
    assert s["engine"]["seed"] != t["engine"]["seed"]
    from dpfast.ledger import releases

    assert len(releases(out / "privacy_ledger.jsonl")) == 3
    assert len(releases(out / "teacher" / "privacy_ledger.jsonl")) == 3


def test_the_discriminator_trains_inside_the_students_release(finished):
    """Its parameters are among the engine's private layers, and they moved (they are trained), so
    they move only through the engine's clipped and noised releases."""
    from dpfast.recipes.dp_sad import Discriminator

    out, _ = finished
    state = final_state(out)
    torch.manual_seed(TINY["seed"] + 17)
    init = Discriminator(1, 4).state_dict()
    assert state["discriminator"] is not None
    assert any(not torch.equal(init[k], state["discriminator"][k]) for k in init)
    n_student = len([k for k in state["model"] if k.endswith("weight") or k.endswith("bias")])
    groups = state["optimizer"]["param_groups"]
    assert sum(len(g["params"]) for g in groups) == n_student + len(init)  # one optimizer over the pair


def _pair(adv=0.5, disc=2.0):
    from dpfast.diffusion.edm import EDMPrecond
    from dpfast.diffusion.unet import DDPMpp
    from dpfast.recipes.dp_sad import Discriminator, StudentPair

    torch.manual_seed(0)
    net = DDPMpp(image_size=8, in_channels=1, num_classes=0, nf=8, ch_mult=(1,), num_res_blocks=1,
                 attn_resolutions=(), init_scale=1.0)
    teacher = EDMPrecond(DDPMpp(image_size=8, in_channels=1, num_classes=0, nf=8, ch_mult=(1,), num_res_blocks=1,
                                attn_resolutions=(), init_scale=1.0)).requires_grad_(False)
    return StudentPair(EDMPrecond(net), Discriminator(1, 4), adv, disc), teacher


def _loss_rows(pair, teacher, x, seed=0):
    from dpfast.recipes.dp_sad import sad_loss_rows

    g = torch.Generator().manual_seed(seed)
    return sad_loss_rows(pair, teacher, x, None, multiplicity=2, p_mean=-1.2, p_std=1.2, label_dropout=0.0,
                         generator=g, num_classes=0, sigma_data=pair.student.sigma_data)


@pytest.mark.parametrize("samples", [1, 3])
def test_one_sample_moves_the_student_and_the_discriminator_by_at_most_C_together(samples):
    """The sensitivity of the shared release: without noise, with SGD at lr 1 and a summed loss, the
    update of the whole pair is the sum of the per-sample clipped gradients, so its norm is at most
    samples x C, while both models receive a share of it."""
    from dpfast import PrivacyEngine

    pair, teacher = _pair()
    before = [p.detach().clone() for p in pair.parameters()]
    opt = torch.optim.SGD(pair.parameters(), lr=1.0)
    C = 1e-3  # far below the gradients' norms: every sample is clipped
    with pytest.warns(UserWarning, match="NOT differentially private"):
        model, opt, _ = PrivacyEngine(seed=3).make_private(module=pair, optimizer=opt, noise_multiplier=0.0,
                                                           max_grad_norm=C, multiplicity=2, loss_reduction="sum",
                                                           expected_batch_size=samples, backend="torch")
    x = torch.rand(samples, 1, 8, 8) * 2 - 1
    _loss_rows(model, teacher, x).sum().backward()
    opt.step()
    deltas = [p.detach() - b for p, b in zip(pair.parameters(), before)]
    total = torch.sqrt(sum(d.square().sum() for d in deltas))
    n_student = len(list(pair.student.parameters()))
    student = torch.sqrt(sum(d.square().sum() for d in deltas[:n_student]))
    disc = torch.sqrt(sum(d.square().sum() for d in deltas[n_student:]))
    assert total <= samples * C * (1 + 1e-4)
    assert student > 0 and disc > 0
    if samples == 1:
        assert total == pytest.approx(C, rel=1e-3)


def test_the_student_ascends_the_discriminators_loss_with_the_adversarial_weight(monkeypatch):
    """Gradient reversal: in one backward the discriminator gets disc_weight x grad of its loss and the
    student gets -adv_weight x grad of the same loss through its output (plus the distillation term)."""
    from dpfast.recipes import dp_sad

    pair, teacher = _pair(adv=0.5, disc=2.0)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    grads = torch.autograd.grad(_loss_rows(pair, teacher, x).sum(), list(pair.parameters()))
    n = len(list(pair.student.parameters()))
    # the two terms computed apart: the distillation loss alone, and the sum without the reversal
    distill = torch.autograd.grad(_loss_rows(dp_sad.StudentPair(pair.student, None, 0.0, 1.0), teacher, x).sum(),
                                  list(pair.student.parameters()))
    monkeypatch.setattr(dp_sad._ReverseGrad, "apply", lambda t, scale: t)
    plain = torch.autograd.grad(_loss_rows(pair, teacher, x).sum(), list(pair.parameters()))
    for g, gp, gd in zip(grads[:n], plain[:n], distill):
        adv_part = gp - gd                      # disc_weight x grad_S of the discriminator's loss
        assert adv_part.abs().sum() > 0
        assert torch.allclose(g, gd - 0.5 / 2.0 * adv_part, atol=1e-6, rtol=1e-4)
    for g, gp in zip(grads[n:], plain[n:]):   # the discriminator descends its own loss
        assert torch.allclose(g, gp, atol=1e-7) and g.abs().sum() > 0


def test_without_the_adversarial_term_there_is_no_discriminator(data_dir, tmp_path):
    out = tmp_path / "nodisc"
    run(TrainConfig(**dict(SAD, sad_adv_weight=0.0, steps=2, sad_teacher_steps=2), data_dir=str(data_dir)), out)
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["sad"]["discriminator"] is None and final_state(out)["discriminator"] is None


def test_the_papers_setting_is_reported_as_not_differentially_private(data_dir, tmp_path):
    """A teacher trained without DP on the private data voids the student's epsilon too: the report's
    epsilon is infinite, guarantee_lost names the teacher, and the student engine's number appears
    only under a conditional key; the final line says the run is not DP."""
    out, lines = tmp_path / "paper", []
    cfg = TrainConfig(**dict(SAD, sad_teacher="nonprivate", sad_teacher_steps=1, steps=2), data_dir=str(data_dir))
    result = run(cfg, out, lines)
    report = json.loads((out / "privacy_report.json").read_text())
    assert "Infinity" in (out / "privacy_report.json").read_text()   # as json writes math.inf
    teacher = json.loads((out / "teacher" / "privacy_report.json").read_text())
    assert result["status"] == "finished" and teacher["private"] is False
    assert report["epsilon"] == math.inf and "teacher" in report["guarantee_lost"]
    assert "nonprivate" in report["guarantee_lost"]
    assert report["epsilon_lower"] == report["epsilon_estimate"] == math.inf
    q = report["sample_rate"]
    own = epsilon_report([(1.0, q, 2)], 1e-5, "rdp").epsilon
    assert report["epsilon_if_teacher_were_public"] == pytest.approx(own, rel=1e-12)
    assert report["end_to_end"] is False and report["sad"]["note"].startswith("NOT differentially private")
    assert "covers the student" not in report["sad"]["note"]
    assert report["sad"]["teacher"]["composed_into_epsilon"] is False
    assert report["sad"]["student"]["epsilon_if_teacher_were_public"] == pytest.approx(own, rel=1e-12)
    assert "epsilon_alone" not in report["sad"]["student"]
    t_row, s_row = report["phases"]
    assert t_row["epsilon"] is None and "WITHOUT" in t_row["note"] and "NOT differentially private" in t_row["note"]
    assert s_row["name"] == "student" and s_row["epsilon"] == math.inf and "epsilon_alone" not in s_row
    assert s_row["epsilon_if_teacher_were_public"] == pytest.approx(own, rel=1e-12)
    # no line prints the student's number as the epsilon spent
    assert lines[-2] == ("finished. this run is NOT differentially private (epsilon infinite): "
                         + report["guarantee_lost"])
    assert not any("epsilon spent" in line for line in lines)
    assert any("this run is NOT differentially private (its teacher was trained without DP)" in line for line in lines)


def test_one_sigma_over_teacher_and_student_meets_the_target(data_dir, tmp_path):
    out = tmp_path / "target"
    cfg = TrainConfig(**dict(SAD, noise_multiplier=None, target_epsilon=8.0, steps=2, sad_teacher_steps=4),
                      data_dir=str(data_dir))
    run(cfg, out)
    report = json.loads((out / "privacy_report.json").read_text())
    teacher = json.loads((out / "teacher" / "privacy_report.json").read_text())
    assert 0.9 * 8.0 < report["epsilon"] <= 8.0
    assert report["noise_multiplier"] == pytest.approx(teacher["noise_multiplier"], rel=0.02)


def test_a_resumed_student_is_the_uninterrupted_one(data_dir, finished, tmp_path):
    out_a, _ = finished
    out_b = tmp_path / "b"
    cfg = TrainConfig(**SAD, data_dir=str(data_dir))
    first = run(cfg.replace(max_steps=1), out_b)
    assert first["steps"] == 1
    run(cfg.replace(deterministic_resume=True), out_b)  # compared with the uninterrupted run
    a, b = final_state(out_a), final_state(out_b)
    assert a["engine"]["seed"] == b["engine"]["seed"]  # pinned in the test config
    assert_same_run(a, b)
    for k in a["discriminator"]:
        assert torch.equal(a["discriminator"][k], b["discriminator"][k]), k
    assert json.loads((out_a / "privacy_report.json").read_text())["epsilon"] == \
        json.loads((out_b / "privacy_report.json").read_text())["epsilon"]


def test_a_student_refuses_a_teacher_it_was_not_composed_with(data_dir, tmp_path):
    from dpfast.diffusion.trainer import atomic_torch_save

    out = tmp_path / "swap"
    cfg = TrainConfig(**SAD, data_dir=str(data_dir))
    run(cfg.replace(max_steps=1), out)
    with pytest.raises(ConfigError, match="other settings"):
        run(cfg.replace(sad_teacher_nf=16), out)
    state = final_state(out / "teacher")
    from dpfast.ledger import new_run_id

    state["engine"]["seed"] += 1  # another teacher run in its place: its own seed and its own (random) run id
    state["engine"]["run_id"] = new_run_id()
    atomic_torch_save(state, out / "teacher" / "checkpoint.pt")
    # its checkpoint names a run its ledger has no release of: refused before its releases are counted
    with pytest.raises(ConfigError, match="cannot be charged: the privacy ledger .* is not this checkpoint's run's"):
        run(cfg, out)


def test_a_dp_sad_model_samples_like_any_run(finished):
    from dpfast.diffusion.trainer import load_sampler

    out, _ = finished
    draw, meta = load_sampler(out)
    images = draw(2, torch.tensor([0, 1]), seed=0, num_steps=2)
    assert images.shape == (2, 1, 8, 8) and meta["config"].recipe == "dp-sad" and torch.isfinite(images).all()


def test_settings_are_checked_before_anything_runs():
    base = TrainConfig(recipe="dp-sad")
    with pytest.raises(ConfigError, match="sad-teacher-steps >= 1"):
        base.validate()
    with pytest.raises(ConfigError, match="belongs to recipe dp-sad"):
        TrainConfig(sad_adv_weight=0.5).validate()
    with pytest.raises(ConfigError, match="sad-disc-weight > 0"):
        base.replace(sad_teacher_steps=1, sad_disc_weight=0.0).validate()
    with pytest.raises(ConfigError, match="sad-teacher must be one of"):
        base.replace(sad_teacher_steps=1, sad_teacher="public").validate()
    with pytest.raises(ConfigError, match="from scratch"):
        base.replace(sad_teacher_steps=1, pretrain_steps=5).validate()
    for name in ("dp-sad-demo", "dp-sad-nodisc-demo", "dp-sad-paper-demo"):
        cfg = PRESETS[name].validate()
        assert cfg.recipe == "dp-sad" and cfg.sad_teacher_nf > cfg.nf  # the student is the smaller model
    assert PRESETS["dp-sad-paper-demo"].sad_teacher == "nonprivate" and PRESETS["dp-sad-nodisc-demo"].sad_adv_weight == 0


# ----------------------------------------------------------------------------- review findings
def test_releases_the_teachers_ledger_records_after_its_checkpoint_are_composed(data_dir, tmp_path):
    """The teacher's spent privacy is its checkpoint plus its ledger: releases recorded after the
    checkpoint (a checkpoint put back) are charged to the student's epsilon."""
    from dpfast.recipes.dp_sad import teacher_config

    out = tmp_path / "ledger"
    cfg = TrainConfig(**SAD, data_dir=str(data_dir))
    run(teacher_config(cfg, 1.0), out / "teacher")  # the teacher alone, as a dp-sad run trains it
    ledger = out / "teacher" / "privacy_ledger.jsonl"
    lines = ledger.read_text().splitlines()
    extra = [json.loads(lines[-1]) for _ in range(2)]
    for i, e in enumerate(extra):  # two releases made after this checkpoint by a run that was rolled back
        e.update(key=3 + i, sampler_step=3 + i)
    ledger.write_text("\n".join(lines + [json.dumps(e) for e in extra]) + "\n")
    with pytest.warns(UserWarning, match="2 steps released after this checkpoint"):
        run(cfg, out)
    report = json.loads((out / "privacy_report.json").read_text())
    q = report["sample_rate"]
    assert report["sad"]["teacher"]["releases_charged"] == 5
    assert report["epsilon"] == pytest.approx(epsilon_report([(1.0, q, 5 + 3)], 1e-5, "rdp").epsilon, rel=1e-12)
    # once a student was composed with the teacher, a teacher ledger that grows is refused
    extra[-1].update(key=5, sampler_step=5)
    with open(ledger, "a") as f:
        f.write(json.dumps(extra[-1]) + "\n")
    with pytest.raises(ConfigError, match="not the one this student was trained with"), \
            pytest.warns(UserWarning, match="released after this checkpoint"):
        run(cfg, out)


def test_a_teacher_checkpoint_put_back_is_refused(data_dir, tmp_path):
    import shutil

    from dpfast.recipes.dp_sad import teacher_config

    out = tmp_path / "back"
    cfg = TrainConfig(**SAD, data_dir=str(data_dir))
    run(teacher_config(cfg, 1.0), out / "teacher")
    shutil.copy(out / "teacher" / "checkpoint.pt", tmp_path / "teacher-ckpt.pt")
    state = final_state(out / "teacher")
    state["step"] = 1  # an older checkpoint of the teacher, beside the finished teacher's model.pt
    from dpfast.diffusion.trainer import atomic_torch_save

    atomic_torch_save(state, out / "teacher" / "checkpoint.pt")
    with pytest.raises(ConfigError, match="not one finished run"):
        run(cfg, out)


def test_no_second_teacher_is_trained_for_an_existing_student(data_dir, tmp_path):
    """A student exists only after its teacher finished; a missing teacher is refused before a new one
    would release the data again."""
    import shutil

    out = tmp_path / "again"
    cfg = TrainConfig(**SAD, data_dir=str(data_dir))
    run(cfg.replace(max_steps=1), out)
    shutil.rmtree(out / "teacher")
    with pytest.raises(ConfigError, match="missing or unfinished"):
        run(cfg, out)
    assert not (out / "teacher").exists()


def test_a_resumed_student_refuses_a_teacher_with_other_weights(data_dir, tmp_path):
    out = tmp_path / "weights"
    cfg = TrainConfig(**SAD, data_dir=str(data_dir))
    run(cfg.replace(max_steps=1), out)
    model = torch.load(out / "teacher" / "model.pt", weights_only=True)
    k = next(iter(model["ema"]))
    model["ema"][k] = model["ema"][k] + 1.0
    torch.save(model, out / "teacher" / "model.pt")
    with pytest.raises(ConfigError, match="not the one this student was trained with"):
        run(cfg, out)


def test_a_run_without_dp_is_not_reported_as_end_to_end(data_dir, tmp_path):
    out = tmp_path / "nodp"
    run(TrainConfig(**dict(SAD, private=False, noise_multiplier=None, steps=2, sad_teacher_steps=2),
                    data_dir=str(data_dir)), out)
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["private"] is False and report["end_to_end"] is False
    assert "without differential privacy" in report["sad"]["note"]


def test_two_pass_with_a_discriminator_is_refused_before_the_teacher_trains():
    with pytest.raises(ConfigError, match="--mode bk"):
        TrainConfig(**dict(SAD, mode="two-pass")).validate()
    TrainConfig(**dict(SAD, mode="two-pass", sad_adv_weight=0.0)).validate()
