"""`dpfast bench --utility` end to end at the smallest size: the grid, its baselines, resuming
(a finished cell is never recomputed, a killed one resumes from its plan and checkpoint), locks,
time budgets turned into steps without touching the private data, and the evaluation's metrics."""
import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import utility as U
from dpfast.diffusion import evaluate as ev
from dpfast.diffusion.presets import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "diffusion"))
from test_data import write_mnist_dir  # noqa: E402

TINY = TrainConfig(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), multiplicity=1, num_classes=4,
                   batch_size=16, lr=1e-3, ema_decay=0.9, max_physical_batch_size=16, accountant="rdp",
                   backend="torch", device="cpu", sample_steps=2, grid_size=2, grid_every=0,
                   checkpoint_every=2, epsilon_every_seconds=0.0)


@pytest.fixture(autouse=True)
def tiny_scale(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setitem(U.RECIPES, "dpdm", U.Recipe("dpdm", "test", {"tiny": TINY, "cpu": TINY}))
    monkeypatch.setitem(U.CLASSIFIER_DP, "tiny", dict(batch_size=16, lr=1e-3, max_grad_norm=1.0,
                                                      max_physical_batch_size=16))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_mnist_dir(tmp_path_factory.mktemp("udata") / "idx", n=80, size=8, classes=4)


def opts(out, data_dir, **kw):
    return U.Options(out=out, data_dir=str(data_dir), scale="tiny", sizes=(12, 24), feature_steps=3,
                     classifier_max_steps=4, metric_samples=30, num_classes=4, progress=False, command="test", log=lambda *a, **k: None, **kw)


def test_parse_budget():
    assert U.parse_budget("300steps") == U.Budget("300steps", steps=300)
    assert U.parse_budget("10m").seconds == 600 and U.parse_budget("1.5h").seconds == 5400
    assert U.parse_budget("45s").seconds == 45
    for bad in ("0steps", "10", "-3m", "fast", "0s"):
        with pytest.raises(ValueError, match="budget"):
            U.parse_budget(bad)


def test_grid_rows_baselines_and_resume(data_dir, tmp_path, monkeypatch):
    every = U.plan_cells(["dpdm"], [4.0], [U.parse_budget("3steps")])
    assert [c.name for c in every] == ["dpdm_eps4_3steps", "dp-sgd-classifier_eps4_3steps",
                                       "dpdm_nonprivate_3steps", "public-only", "real-data"]
    assert [c.name for c in U.plan_cells(["dpdm"], [4.0], [U.parse_budget("3steps")], ("public-only",),
                                         nonprivate=False)] == ["dpdm_eps4_3steps", "public-only"]
    # the public-only cell samples the shipped 14x14 model: not on this 8x8 data set
    cells = U.plan_cells(["dpdm"], [4.0], [U.parse_budget("3steps")], ("dp-sgd-classifier", "real-data"))
    grid = U.Grid(cells, opts(tmp_path / "g", data_dir))
    rows = {r["cell"]: r for r in grid.run()}
    assert set(rows) == {c.name for c in cells}
    dp = rows["dpdm_eps4_3steps"]
    assert dp["steps"] == 3 and 4.0 * 0.95 <= dp["epsilon"] <= 4.0 * (1 + 1e-9) and dp["end_to_end"] is True
    assert dp["noise_seed"] == "os (secret)" and dp["commit"] and dp["command"] == "test"
    assert dp["samples"] == 30 and {"acc_12", "acc_24", "fid", "precision", "recall"} <= set(dp)
    assert 0 <= dp["precision"] <= 1 and 0 <= dp["recall"] <= 1
    assert "dpfast train --config" in dp["train_command"]
    clf = rows["dp-sgd-classifier_eps4_3steps"]
    assert 4.0 * 0.95 <= clf["epsilon"] <= 4.0 * (1 + 1e-9) and 0 <= clf["acc_direct"] <= 1
    assert rows["dpdm_nonprivate_3steps"]["epsilon"] == math.inf
    assert rows["real-data"]["samples"] == 80
    with open(tmp_path / "g" / "results.csv") as f:
        assert [r["cell"] for r in csv.DictReader(f)] == [c.name for c in cells]
    md = (tmp_path / "g" / "results.md").read_text()
    assert "DP-SGD classifier on real data" in md and "real data (classifier ceiling)" in md
    assert (tmp_path / "g" / "accuracy_vs_epsilon.png").stat().st_size > 0

    # a finished cell is never recomputed
    def boom(self, cell):
        raise AssertionError(f"recomputed {cell.name}")
    monkeypatch.setattr(U.Grid, "run_cell", boom)
    assert len(U.Grid(cells, opts(tmp_path / "g", data_dir)).run()) == 4


def test_killed_cell_resumes_from_its_plan(data_dir, tmp_path, monkeypatch):
    """A cell whose process dies after three releases but before any periodic checkpoint resumes from
    the step-0 checkpoint with its planned steps and sigma; the ledger charges the three lost releases
    (the row says so: epsilon above the target, releases_charged 7 for 4 steps)."""
    cell = U.plan_cells(["dpdm"], [4.0], [U.parse_budget("4steps")], baselines=())[0]
    out = tmp_path / "k"
    from dpfast.diffusion.ema import EMA
    original = EMA.update
    calls = {"n": 0}

    def dies(self, model):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("the machine went away")
        return original(self, model)
    monkeypatch.setattr(EMA, "update", dies)
    monkeypatch.setitem(U.RECIPES, "dpdm", U.Recipe("dpdm", "test", {"tiny": TINY.replace(checkpoint_every=100)}))
    assert U.Grid([cell], opts(out, data_dir)).run() == []
    d = out / "cells" / cell.name
    assert "the machine went away" in json.loads((d / "error.json").read_text())["error"]
    plan = json.loads((d / "plan.json").read_text())
    assert torch.load(d / "run" / "checkpoint.pt", weights_only=False)["step"] == 0
    monkeypatch.setattr(EMA, "update", original)
    first_sigma = torch.load(d / "run" / "checkpoint.pt", weights_only=False)["noise_multiplier"]
    row = U.Grid([cell], opts(out, data_dir)).run()[0]
    assert row["steps"] == 4 == plan["steps"] and row["noise_multiplier"] == first_sigma
    assert row["releases_charged"] == 7 and row["epsilon"] > 4.0  # the 3rd release happened before its EMA update
    assert not (d / "error.json").exists()


def test_a_held_cell_is_left_to_its_holder(data_dir, tmp_path):
    cell = U.plan_cells(["dpdm"], [4.0], [U.parse_budget("2steps")], baselines=())[0]
    grid = U.Grid([cell], opts(tmp_path / "h", data_dir))
    held = U.CellLock(grid.cell_dir(cell))
    assert held.held and not U.CellLock(grid.cell_dir(cell)).held
    assert grid.run() == [] and not (grid.cell_dir(cell) / "plan.json").exists()
    held.release()                      # as when its process dies: the kernel drops the lock
    assert len(grid.run()) == 1


def test_other_settings_in_the_same_out_are_refused(data_dir, tmp_path):
    cell = U.plan_cells(["dpdm"], [4.0], [U.parse_budget("1steps")], baselines=())[0]
    U.Grid([cell], opts(tmp_path / "p", data_dir)).run()
    with pytest.raises(ValueError, match="other settings.*seed: 0 -> 1"):
        U.Grid([cell], opts(tmp_path / "p", data_dir, seed=1)).run()


def test_time_budget_is_turned_into_steps(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(U, "pilot_seconds_per_step", lambda cfg, data: 0.5)
    monkeypatch.setattr(U, "pilot_classifier_seconds_per_step", lambda data, settings, device: 0.25)
    cells = U.plan_cells(["dpdm"], [4.0], [U.parse_budget("2s")], baselines=("dp-sgd-classifier",))
    rows = {r["kind"]: r for r in U.Grid(cells, opts(tmp_path / "t", data_dir)).run()}
    assert rows["generator"]["steps"] == 4 and rows["generator"]["pilot_seconds_per_step"] == 0.5
    assert rows["dp-sgd-classifier"]["steps"] == 8


def test_pilots_never_see_the_private_images(data_dir, monkeypatch):
    from dpfast.diffusion import trainer as T

    real = ev.load_dataset(data_dir, "train")
    seen = []
    original_init = T.Trainer.__init__

    def spy(self, cfg, out_dir, dataset=None, **kw):
        seen.append(dataset)
        return original_init(self, cfg, out_dir, dataset=dataset, **kw)
    monkeypatch.setattr(T.Trainer, "__init__", spy)
    sps = U.pilot_seconds_per_step(TINY.replace(noise_multiplier=1.0), real)
    assert 0 < sps < 60 and len(seen) == 2
    clf = []
    original_clf = U.train_dp_classifier

    def spy_clf(train, *a, **k):
        clf.append(train)
        return original_clf(train, *a, **k)
    monkeypatch.setattr(U, "train_dp_classifier", spy_clf)
    assert 0 < U.pilot_classifier_seconds_per_step(real, U.CLASSIFIER_DP["tiny"]) < 60
    assert len(clf) == 2
    for fake in seen + clf:
        assert fake.name == "random (pilot)" and fake.images.shape == real.images.shape
        assert not torch.equal(fake.images, real.images) and fake.num_classes == real.num_classes


def test_cli_errors_are_one_line_and_before_any_work(tmp_path, capsys):
    from benchmarks.cli import main

    for argv, msg in ((["--recipes", "nope"], "unknown recipe 'nope'"),
                      (["--budget", "fast"], "budget 'fast'"),
                      (["--epsilons", "0"], "positive and finite"),
                      (["--baselines", "opacus"], "unknown baseline"),
                      (["--data-dir", str(tmp_path / "none")], "No train data")):
        assert main(["--utility", "--out", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and err.startswith("dpfast bench --utility:"), err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- the metrics
def test_precision_recall_known_answers():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=g, dtype=torch.float64).numpy()
    p, r = ev.precision_recall(real, real.copy())
    assert p == 1.0 and r == 1.0
    far = real + 100.0
    assert ev.precision_recall(real, far) == (0.0, 0.0)
    # fakes that cover half the real support: precision ~1, recall ~1/2 (and swapped, the reverse)
    square = torch.rand(2000, 2, generator=g, dtype=torch.float64)
    left = torch.rand(2000, 2, generator=g, dtype=torch.float64) * torch.tensor([0.5, 1.0], dtype=torch.float64)
    p, r = ev.precision_recall(square.numpy(), left.numpy())
    assert p > 0.97 and 0.45 < r < 0.56, (p, r)
    p, r = ev.precision_recall(left.numpy(), square.numpy())
    assert 0.45 < p < 0.56 and r > 0.97, (p, r)
    with pytest.raises(ValueError, match="more than 3 points"):
        ev.precision_recall(real[:3], real)


def test_classifier_respects_its_step_cap():
    calls = {"n": 0}
    x = torch.randint(0, 256, (100, 1, 8, 8), dtype=torch.uint8)
    y = torch.arange(100) % 3
    orig = torch.optim.Adam.step

    def counting(self, *a, **k):
        calls["n"] += 1
        return orig(self, *a, **k)
    torch.optim.Adam.step = counting
    try:
        model, acc, epoch = ev.train_classifier(x, y, x[:10], y[:10], 3, epochs=20, max_steps=7, batch_size=10)
    finally:
        torch.optim.Adam.step = orig
    assert calls["n"] == 7 and epoch == 1


def test_feature_network_is_cached_by_data_and_code(data_dir, tmp_path, monkeypatch):
    real = ev.load_dataset(data_dir, "train")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a = ev.feature_network(real, steps=2, progress=False)
    files = list((tmp_path / "dpfast").glob("feature_cnn_*.pt"))
    assert len(files) == 1

    def no_training(*a, **k):
        raise AssertionError("retrained")
    monkeypatch.setattr(torch.optim.Adam, "step", no_training)
    b = ev.feature_network(real, steps=2, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ev.feature_network(real.subset(60), steps=2, progress=False)        # other data: another key
    ev.feature_network(real, steps=3, progress=False)                   # other settings: another key
    assert len(list((tmp_path / "dpfast").glob("feature_cnn_*.pt"))) == 3


def test_evaluate_images_sizes_are_nested_and_capped(data_dir):
    test = ev.load_dataset(data_dir, "test")
    x = torch.randint(0, 256, (30, 1, 8, 8), dtype=torch.uint8)
    y = torch.arange(30) % 4
    rep = ev.evaluate_images(x, y, test, None, sizes=(10, 20, 50), max_steps=2, log=lambda *a: None,
                             progress=False)
    assert list(rep["downstream"]) == ["10", "20", "30"]
    seen = []
    original = ev.downstream_accuracy
    ev.downstream_accuracy = lambda images, *a, **k: (seen.append(images), original(images, *a, **k))[1]
    try:
        ev.evaluate_images(x, y, test, None, sizes=(10, 20), max_steps=1, log=lambda *a: None, progress=False)
    finally:
        ev.downstream_accuracy = original
    assert torch.equal(seen[1][:10], seen[0]) and not torch.equal(seen[1][:10], x[:10])  # nested, shuffled
    assert rep["downstream"]["30"]["train_samples"] == 27
    with pytest.raises(ValueError, match="images are"):
        ev.evaluate_images(x[:, :, :4, :4], y, test, None, log=lambda *a: None)


def test_every_recipe_meets_its_target_epsilon_in_the_grid(data_dir, tmp_path, monkeypatch):
    """The grid fixes the target and the steps; each recipe calibrates its own noise (DP-SGD over the
    steps, DP-MEPF's one release whatever the steps), so every private row spends its target."""
    mepf = TrainConfig(recipe="dp-mepf", steps=3, batch_size=8, nf=8, multiplicity=1, num_classes=4,
                       mepf_feature_steps=2, device="cpu", grid_size=2, accountant="rdp")
    monkeypatch.setitem(U.RECIPES, "dp-mepf", U.Recipe("dp-mepf", "test", {"tiny": mepf}))
    cells = U.plan_cells(["dpdm", "dp-mepf"], [1.0, 4.0], [U.parse_budget("3steps")], baselines=())
    rows = U.Grid(cells, opts(tmp_path / "e", data_dir)).run()
    private = [r for r in rows if r["epsilon_target"] != math.inf]
    assert len(private) == 4
    for r in private:
        assert 0.9 * r["epsilon_target"] <= r["epsilon"] <= r["epsilon_target"] * (1 + 1e-9), r


def test_dp_sad_cells_spend_a_share_of_the_budget_on_their_teacher(data_dir, tmp_path, monkeypatch):
    """DP-SAD's teacher trains inside the cell's time budget: teacher steps at the teacher's DPDM step
    time, the rest to the student; epsilon covers both, and the row says whether it is end to end."""
    sad = TINY.replace(recipe="dp-sad", sad_teacher_steps=1, sad_teacher_nf=8, sad_disc_nf=4)
    for name, teacher in (("dp-sad", "dp"), ("dp-sad-paper", "nonprivate")):
        monkeypatch.setitem(U.RECIPES, name, U.Recipe(name, "test", {"tiny": sad.replace(sad_teacher=teacher)},
                                                      end_to_end=teacher == "dp", teacher_share=0.5, pilot="dp-sad"))
    monkeypatch.setattr(U, "pilot_seconds_per_step", lambda cfg, data: 0.25 if cfg.recipe == "dpdm" else 0.5)
    cells = U.plan_cells(["dp-sad", "dp-sad-paper"], [6.0], [U.parse_budget("4s")], baselines=(), nonprivate=False)
    grid = U.Grid(cells, opts(tmp_path / "sad", data_dir))
    rows = {r["recipe"]: r for r in grid.run()}
    for name, row in rows.items():
        assert row["steps"] == 4 and row["teacher_steps"] == 8       # 2 s / 0.5 and 2 s / 0.25
    assert rows["dp-sad"]["epsilon"] <= 6.0
    assert rows["dp-sad-paper"]["epsilon"] == math.inf  # a teacher without DP: no epsilon holds for the run
    assert rows["dp-sad"]["end_to_end"] is True and rows["dp-sad-paper"]["end_to_end"] is False
    plan = json.loads((grid.cell_dir(cells[0]) / "plan.json").read_text())
    assert plan["config"]["sad_teacher_steps"] == 8 and plan["teacher_seconds_per_step"] == 0.25
    assert "+8 teacher" in (tmp_path / "sad" / "results.md").read_text()
    assert set(json.loads((tmp_path / "sad" / "pilots.json").read_text())) == {
        "dp-sad:teacher-private", "dp-sad:teacher-non-private", "dp-sad:private"}
    # the teacher, evaluated under the grid's protocol as a row of its own
    from benchmarks.evaluate_run import evaluate_run

    o = opts(tmp_path / "sad", data_dir)
    teacher = evaluate_run(tmp_path / "sad", grid.cell_dir(cells[0]) / "run" / "teacher", "teacher", progress=False,
                           log=o.log, data_dir=o.data_dir, scale=o.scale, sizes=o.sizes, feature_steps=o.feature_steps,
                           classifier_max_steps=o.classifier_max_steps, metric_samples=o.metric_samples,
                           num_classes=o.num_classes)
    assert teacher["steps"] == 8 and teacher["epsilon"] < rows["dp-sad"]["epsilon"] and "fid" in teacher
    assert json.loads((tmp_path / "sad" / "extra" / "teacher" / "result.json").read_text())["name"] == "teacher"


def test_syngen_cells_spend_a_share_of_the_budget_on_their_public_phase(data_dir, tmp_path, monkeypatch):
    """DP-SynGen's public phase runs inside the cell's time budget: public steps at the non-private
    step time, the rest of the budget to the private phase (which its noise is calibrated for)."""
    syngen = TINY.replace(recipe="dp-syngen", syngen="cleaning", pretrain_steps=1, public_data="dead-leaves:40")
    monkeypatch.setitem(U.RECIPES, "syngen-cleaning", U.Recipe("syngen-cleaning", "test", {"tiny": syngen},
                                                               public_share=0.25, pilot="syngen"))
    monkeypatch.setattr(U, "pilot_seconds_per_step", lambda cfg, data: 0.5 if cfg.private else 0.25)
    cells = U.plan_cells(["syngen-cleaning"], [4.0], [U.parse_budget("4s")], baselines=(), nonprivate=False)
    grid = U.Grid(cells, opts(tmp_path / "s", data_dir))
    (row,) = grid.run()
    assert row["steps"] == 6 and row["public_steps"] == 4          # 3 s / 0.5 and 1 s / 0.25
    plan = json.loads((grid.cell_dir(cells[0]) / "plan.json").read_text())
    assert plan["config"]["pretrain_steps"] == 4 and plan["public_seconds_per_step"] == 0.25
    report = json.loads((grid.cell_dir(cells[0]) / "run" / "privacy_report.json").read_text())
    assert [p["steps"] for p in report["phases"]] == [4, 6] and report["epsilon"] <= 4.0
    assert "+4 public" in (tmp_path / "s" / "results.md").read_text()
    assert set(json.loads((tmp_path / "s" / "pilots.json").read_text())) == {"syngen:public", "syngen:private"}
    from benchmarks.sample_sheet import sheet

    png = sheet(tmp_path / "s", [cells[0].name], tmp_path / "sheet.png")
    assert png.stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="no finished cell"):
        sheet(tmp_path / "s", ["nope"], tmp_path / "x.png")
