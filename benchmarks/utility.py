"""`dpfast bench --utility`: which recipe gives the most useful synthetic data for a privacy and
compute budget. A grid of recipes x epsilon x budget; each cell is trained, sampled and evaluated
with one protocol (`dpfast.diffusion.evaluate`: downstream accuracy with selection on synthetic data
only, feature-space FID / precision / recall), beside these baselines:

- ``dp-sgd-classifier``: DPDM's downstream CNN trained directly on the real data with DP-SGD through
  dpfast's engine, at the same epsilon and budget ("synthetic data vs task-specific DP-SGD");
- ``<recipe>`` at epsilon ``inf``: the same generator trained without privacy on the same budget;
- ``real-data``: the downstream CNN trained on n real training images (the classifier's ceiling);
- ``public-only``: the shipped public model (builtin:demo14) sampled as it is, epsilon 0: what
  pre-training alone gives, before any private fine-tuning.

The budget counts the private run's training. Public pre-training is outside it: the fine-tuning
recipes start from the shipped builtin:demo14 (its pre-training took ~16 min on one thread), and
dp-ldm's autoencoder and public latent phase run inside its cell (their time is in train s).

A budget is a number of logical steps (``300steps``) or of training seconds (``10m``, ``600s``). A
time budget is turned into a step count before any private data is touched, by timing a few steps
of the same configuration on random images of the same shape and number (`pilot_seconds_per_step`):
the noise multiplier is calibrated for that step count, so the reported epsilon is the target and
training time is spent as planned, within the machine's noise (the row has the measured time).

Layout of --out (rerunning the command resumes; several processes may run it at once, each takes
the next cell nobody holds):
    cells/<cell>/plan.json     the cell's settings, decided once (steps, sigma, seeds, command)
    cells/<cell>/run/          a `dpfast train` output directory (checkpoints: a killed cell resumes)
    cells/<cell>/samples.npz   the synthetic samples (written atomically)
    cells/<cell>/result.json   the row; a cell with it is never recomputed
    results.csv, results.md, accuracy_vs_epsilon.png   rewritten after every cell
"""
from __future__ import annotations

import csv
import json
import math
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dpfast.diffusion import evaluate as ev
from dpfast.diffusion.data import ImageDataset
from dpfast.diffusion.presets import PRESETS, TrainConfig
from dpfast.diffusion.trainer import atomic_write_bytes, atomic_write_json

PILOT_STEPS = 6          # timed after one warm-up step
DELTA = 1e-5


# ----------------------------------------------------------------------------- budgets
@dataclass(frozen=True)
class Budget:
    text: str
    steps: int | None = None
    seconds: float | None = None


def parse_budget(text: str) -> Budget:
    """'300steps' -> 300 logical steps; '10m', '600s', '1.5h' -> training seconds."""
    t = text.strip().lower()
    m = re.fullmatch(r"(\d+)\s*steps?", t)
    if m:
        if int(m.group(1)) < 1:
            raise ValueError(f"budget {text!r}: at least 1 step")
        return Budget(text.strip(), steps=int(m.group(1)))
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|m|min|h)", t)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"budget {text!r}: give steps ('300steps') or a positive time ('600s', '10m', '2h')")
    scale = {"s": 1, "m": 60, "min": 60, "h": 3600}[m.group(2)]
    return Budget(text.strip(), seconds=float(m.group(1)) * scale)


# ----------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Recipe:
    """A way to train a generator. `configs[scale]` is the TrainConfig of a private run (its
    epsilon, steps and seeds are set by the cell)."""
    name: str
    description: str
    configs: dict
    end_to_end: bool = True      # does the reported epsilon cover every use of the private data?
    public_share: float = 0.0    # the share of a time budget spent on the run's public phase (dp-syngen)
    teacher_share: float = 0.0   # the share of a time budget spent on the run's teacher (dp-sad)
    pilot: str | None = None     # recipes with the same step cost share one pilot (default: the name)

    def config(self, scale: str) -> TrainConfig:
        if scale not in self.configs:
            raise ValueError(f"recipe {self.name} has no {scale!r} configuration (it has {sorted(self.configs)})")
        return self.configs[scale]


RECIPES: dict[str, Recipe] = {
    "dpdm": Recipe(
        "dpdm", "DPDM (Dockhorn et al.): DP-SGD from scratch, EDM loss, noise multiplicity",
        {"cpu": PRESETS["demo"].replace(grid_every=0, checkpoint_every=50, sample_steps=10),
         "paper": PRESETS["dpdm-fmnist-eps10"]}),
    "dp-mepf": Recipe(
        "dp-mepf", "DP-MEPF (Harder et al.): one noisy release of mean embeddings in the feature space of a "
                   "network trained on public data (sklearn digits), then a generator trained on them",
        {"cpu": PRESETS["dp-mepf-eps10"].replace(resolution=14, device="cpu", threads=1),
         "paper": PRESETS["dp-mepf-eps10"]}),
    # public pre-training, then private fine-tuning (dpfast.diffusion.phases): the pre-trained model is
    # the shipped builtin:demo14 (its pre-training is not part of the budget; dp-ldm pre-trains its
    # autoencoder and latent model in the cell, and that time is not counted in the budget either)
    "dp-diffusion": Recipe(
        "dp-diffusion", "DP-Diffusion (Ghalebikesabi et al.): full DP fine-tuning of the public model, augmentation "
                        "multiplicity K=4 (flip+crop), biased noise levels",
        {"cpu": PRESETS["dp-diffusion-demo"].replace(grid_every=0, checkpoint_every=50, sample_steps=10)}),
    "dp-lora": Recipe(
        "dp-lora", "DP-LoRA (Tsai et al.): DP fine-tuning of rank-4 LoRA adapters only, on the public model",
        {"cpu": PRESETS["dp-lora-demo"].replace(grid_every=0, checkpoint_every=50, sample_steps=10)}),
    "dp-ldm": Recipe(
        "dp-ldm", "DP-LDM (Lyu et al.): public autoencoder and latent pre-training, DP fine-tuning of attention "
                  "and class embedding only",
        {"cpu": PRESETS["dp-ldm-demo"].replace(grid_every=0, checkpoint_every=50, sample_steps=10)}),
}
# DP-SynGen (Choi et al.): a public phase on generated dead leaves for one stage, DP-SGD on the rest. Its
# public phase runs inside the cell's budget: a quarter of it, the rest to the private phase
SYNGEN_SHARE = 0.25
for _variant, _text in (("coarse", "the coarse stage (sigma > tau)"), ("cleaning", "the cleaning stage (sigma <= tau)"),
                        ("finetune", "every noise level, then DP fine-tuning of all of them")):
    RECIPES[f"syngen-{_variant}"] = Recipe(
        f"syngen-{_variant}", f"DP-SynGen (Choi et al.): generated dead leaves for {_text}; DP-SGD on the rest "
                              "(the elbow rule's tau; public phase inside the budget)",
        {"cpu": PRESETS[f"syngen-{_variant}"].replace(grid_every=0, checkpoint_every=50, sample_steps=10)},
        public_share=SYNGEN_SHARE, pilot="syngen")
for _tau in (0.05, 0.8):  # the elbow rule's tau (0.206 for cleaning) against one 4x lower and one 4x higher
    RECIPES[f"syngen-cleaning-tau{_tau:g}"] = Recipe(
        f"syngen-cleaning-tau{_tau:g}", f"syngen-cleaning with tau = {_tau:g} instead of the elbow rule's",
        {"cpu": PRESETS["syngen-cleaning"].replace(grid_every=0, checkpoint_every=50, sample_steps=10, tau=_tau)},
        public_share=SYNGEN_SHARE, pilot="syngen")
# DP-SAD (Liu et al.): the teacher's training runs inside the cell's budget (half of it), the student's
# distillation takes the rest
SAD_TEACHER_SHARE = 0.5
for _name, _preset, _text, _e2e in (
        ("dp-sad", "dp-sad-demo", "a DP teacher (nf 24), then the demo U-Net distilled from it against a discriminator; "
                                  "epsilon covers all three", True),
        ("dp-sad-nodisc", "dp-sad-nodisc-demo", "dp-sad without the discriminator (the paper's ablation)", True),
        ("dp-sad-paper", "dp-sad-paper-demo", "the paper's setting: the teacher WITHOUT DP, so NOT differentially "
                                              "private (epsilon infinite; the student's own number is reported "
                                              "as epsilon_if_teacher_were_public)", False)):
    RECIPES[_name] = Recipe(
        _name, f"DP-SAD (Liu et al.): {_text}" + (" (teacher inside the budget)" if _e2e else ""),
        {"cpu": PRESETS[_preset].replace(grid_every=0, checkpoint_every=50, sample_steps=10)},
        # one pilot for all three: the ablation gets dp-sad's step counts, so it differs by the discriminator only
        end_to_end=_e2e, teacher_share=SAD_TEACHER_SHARE, pilot="dp-sad")
BASELINES = ("dp-sgd-classifier", "real-data", "public-only")
# the public-only baseline: the pre-trained model sampled as it is (no private data, epsilon 0)
PUBLIC_ONLY_MODEL = "builtin:demo14"

# the DP-SGD classifier baseline: DPDM's CNN, Adam, C=1, Poisson batches of this expected size
CLASSIFIER_DP = {"cpu": dict(batch_size=512, lr=1e-3, max_grad_norm=1.0, max_physical_batch_size=512),
                 "paper": dict(batch_size=2048, lr=1e-3, max_grad_norm=1.0, max_physical_batch_size=1024)}


@dataclass(frozen=True)
class Cell:
    kind: str                 # generator | dp-sgd-classifier | real-data
    recipe: str               # the recipe, or the baseline's name
    epsilon: float | None     # None: not private
    budget: Budget | None

    @property
    def name(self) -> str:
        if self.kind in ("real-data", "public-only"):
            return self.kind
        eps = "nonprivate" if self.epsilon is None else f"eps{self.epsilon:g}"
        return f"{self.recipe}_{eps}_{self.budget.text.replace(' ', '')}"


def plan_cells(recipes, epsilons, budgets, baselines=BASELINES, nonprivate: bool = True) -> list[Cell]:
    cells = []
    for budget in budgets:
        for eps in epsilons:
            cells += [Cell("generator", r, eps, budget) for r in recipes]
            if "dp-sgd-classifier" in baselines:
                cells.append(Cell("dp-sgd-classifier", "dp-sgd-classifier", eps, budget))
        if nonprivate:
            cells += [Cell("generator", r, None, budget) for r in recipes]
    if "public-only" in baselines:
        cells.append(Cell("public-only", "public-only", 0.0, None))
    if "real-data" in baselines:
        cells.append(Cell("real-data", "real-data", None, None))
    return cells


# ----------------------------------------------------------------------------- locks
class CellLock:
    """One process per cell: an exclusive, non-blocking flock on cells/<cell>/lock. The kernel drops
    it when its process dies, however it dies, so a killed cell is free for the next run at once."""

    def __init__(self, cell_dir: Path):
        import fcntl

        cell_dir.mkdir(parents=True, exist_ok=True)
        self._f = open(cell_dir / "lock", "a+")
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.close()
            self._f = None

    @property
    def held(self) -> bool:
        return self._f is not None

    def release(self) -> None:
        if self._f is not None:
            self._f.close()  # closing the file drops the lock
            self._f = None


# ----------------------------------------------------------------------------- pilots
def _random_like(data: ImageDataset, seed: int = 0) -> ImageDataset:
    """Random images of the data's shape, number and classes: step time does not depend on pixel
    values, so pilots time steps without touching the private data."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, data.images.shape, dtype=torch.uint8, generator=g)
    labels = torch.randint(0, max(1, data.num_classes), (len(data),), generator=g)
    return ImageDataset(images, labels, data.num_classes, name="random (pilot)",
                        classes_declared=data.classes_declared)


def pilot_seconds_per_step(cfg: TrainConfig, data: ImageDataset) -> float:
    """Seconds per logical step of `cfg` (private or not, any recipe `dpfast train` runs), timed on
    random data: one step (setup, compilation, warm-up), then PILOT_STEPS more in a resumed run."""
    from dpfast.diffusion import trainer as T

    fake = _random_like(data)
    if cfg.recipe == "dp-syngen":  # its steps cost a DPDM step of the same model (only sigma's range differs)
        cfg = cfg.replace(recipe="dpdm", syngen=None, tau=None)
    pilot = cfg.replace(steps=PILOT_STEPS + 1, target_epsilon=None, grid_size=1, sample_steps=1,
                        checkpoint_every=10 ** 9, checkpoint_seconds=1e12, time_budget=None, max_steps=None,
                        noise_multiplier=1.0 if cfg.private else None, subset=None,
                        resolution=None if cfg.recipe != "dp-ldm" else cfg.resolution,
                        data_dir=None, noise_seed=None, mepf_feature_steps=1, pretrain_steps=0,
                        ldm_autoencoder_steps=1, sad_teacher_steps=1 if cfg.recipe == "dp-sad" else 0)
    quiet = dict(dataset=fake, progress=False, log=lambda *a, **k: None)
    with tempfile.TemporaryDirectory(prefix="dpfast-pilot-") as tmp:
        first = T.train(pilot.replace(max_steps=1), tmp, **quiet)
        rest = T.train(pilot, tmp, **quiet)
    return max(1e-6, (rest["train_seconds"] - first["train_seconds"]) / PILOT_STEPS)


def train_dp_classifier(train: ImageDataset, noise_multiplier: float, steps: int, batch_size: int,
                        lr: float, max_grad_norm: float, max_physical_batch_size: int, seed: int = 0,
                        progress: bool = False, desc: str = "DP-SGD classifier", device="cpu"):
    """DPDM's CNN trained with DP-SGD (Poisson batches of expected size `batch_size`, per-sample
    clipping at `max_grad_norm`, Gaussian noise) through dpfast's engine. Returns (model, engine).
    The engine's seed comes from the OS; the final model is kept (no selection on any real data)."""
    from torch.nn import functional as F
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from dpfast import PrivacyEngine

    torch.manual_seed(seed)
    c, h, _ = train.image_shape
    model = ev.CNN(c, h, max(1, train.num_classes)).to(device)
    for m in model.modules():
        # Dropout draws its masks for the whole batch in batch order from the global RNG, seeded above
        # by a public seed: one record's presence would move every later record's mask, and with it the
        # clipped sum by more than C. Off for DP training (the classifiers trained on synthetic data keep it).
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    engine = PrivacyEngine(accountant="prv")
    q = min(1.0, batch_size / len(train))
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(train, batch_size=batch_size),
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, poisson_sampling=True,
        max_physical_batch_size=max_physical_batch_size, sample_rate=q, backend="auto")
    model.train()
    done = 0
    with tqdm(total=steps, desc=desc, unit="step", disable=not progress, dynamic_ncols=True, leave=False) as bar:
        while done < steps:
            for x, y in loader:
                optimizer.zero_grad()
                if len(x):
                    F.cross_entropy(model(x.to(device)), y.to(device)).backward()
                if optimizer.step():
                    done += 1
                    bar.update(1)
                    if done >= steps:
                        break
    return model.eval(), engine


def pilot_classifier_seconds_per_step(data: ImageDataset, settings: dict, device="cpu") -> float:
    """Seconds per step of the DP-SGD classifier, timed on random data (setup subtracted)."""
    fake = _random_like(data)
    started = time.perf_counter()
    train_dp_classifier(fake, 1.0, 1, device=device, **settings)
    one = time.perf_counter() - started
    started = time.perf_counter()
    train_dp_classifier(fake, 1.0, PILOT_STEPS + 1, device=device, **settings)
    return max(1e-6, (time.perf_counter() - started - one) / PILOT_STEPS)


# ----------------------------------------------------------------------------- the grid
@dataclass
class Options:
    out: Path
    data_dir: str | None = None
    scale: str = "cpu"
    sizes: tuple = ev.SIZES
    seed: int = 0
    threads: int | None = None
    sample_steps: int | None = None       # None: the recipe's
    classifier_max_steps: int | None = ev.CLASSIFIER_MAX_STEPS
    feature_steps: int = ev.FEATURE_STEPS
    metric_samples: int = ev.METRIC_SAMPLES   # images per side for FID / precision / recall
    num_classes: int | None = None            # the public class count (None: the data's declared one)
    device: str = "auto"       # recipes keep their own device setting; sampling and evaluation use this
    progress: bool = True
    plots: bool = True
    command: str = ""
    log: object = print


class Grid:
    def __init__(self, cells: list[Cell], opts: Options):
        from .harness import environment

        self.cells, self.opts = cells, opts
        self.out = Path(opts.out)
        (self.out / "cells").mkdir(parents=True, exist_ok=True)
        from dpfast.diffusion.trainer import resolve_device

        self.device = resolve_device(opts.device)
        self.env = environment(self.device)
        if opts.threads:
            torch.set_num_threads(opts.threads)
        self._real = None
        self._feature_net = None

    # -- shared inputs, loaded once
    def real(self) -> tuple[ImageDataset, ImageDataset]:
        """The real training and test sets, with the grid's public class count."""
        if self._real is None:
            train, test = ev.real_splits(self.opts.data_dir, self.eval_resolution())
            if self.opts.num_classes is not None:
                train, test = (ImageDataset(d.images, d.labels, self.opts.num_classes, d.name) for d in (train, test))
            elif not train.classes_declared:
                raise ValueError(f"the number of classes of {train.name} would be read off its private labels: "
                                 "pass --num-classes N")
            self._real = train, test
        return self._real

    def eval_resolution(self) -> int | None:
        res = {self.base_config(c.recipe).resolution for c in self.cells if c.kind == "generator"}
        if len(res) > 1:
            raise ValueError(f"the grid's recipes train at different resolutions {sorted(map(str, res))}: "
                             "one table needs one evaluation resolution")
        return res.pop() if res else PRESETS["demo"].resolution if self.opts.scale == "cpu" else None

    def feature_net(self):
        if self._feature_net is None:
            self._feature_net = ev.feature_network(self.real()[0], steps=self.opts.feature_steps,
                                                   seed=self.opts.seed, log=self.opts.log,
                                                   progress=self.opts.progress, device=self.device)
        return self._feature_net

    def base_config(self, recipe: str) -> TrainConfig:
        cfg = RECIPES[recipe].config(self.opts.scale)
        changes = dict(data_dir=self.opts.data_dir, seed=self.opts.seed, noise_seed=None,
                       device=str(self.device), num_classes=self.opts.num_classes)
        if self.opts.threads:
            changes["threads"] = self.opts.threads
        if self.opts.sample_steps:
            changes["sample_steps"] = self.opts.sample_steps
        return cfg.replace(**changes)

    # -- the loop
    def run(self) -> list[dict]:
        from tqdm import tqdm

        self._check_protocol()
        todo = [c for c in self.cells if not (self.cell_dir(c) / "result.json").exists()]
        self.opts.log(f"utility grid: {len(self.cells)} cells, {len(self.cells) - len(todo)} done, "
                      f"results in {self.out}")
        skipped, failed = [], []
        with tqdm(total=len(self.cells), initial=len(self.cells) - len(todo), desc="utility grid",
                  unit="cell", disable=not self.opts.progress, dynamic_ncols=True) as bar:
            for cell in todo:
                d = self.cell_dir(cell)
                lock = CellLock(d)
                if not lock.held:
                    skipped.append(cell.name)
                    continue
                try:
                    if (d / "result.json").exists():      # finished by another process meanwhile
                        bar.update(1)
                        continue
                    bar.set_postfix_str(cell.name)
                    (d / "error.json").unlink(missing_ok=True)
                    try:
                        row = self.run_cell(cell)
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as e:  # noqa: BLE001 - one failing cell must not stop the grid
                        import traceback

                        self.opts.log(f"cell {cell.name} failed: {type(e).__name__}: {e}")
                        atomic_write_json({"cell": cell.name, "error": f"{type(e).__name__}: {e}",
                                           "traceback": traceback.format_exc()}, d / "error.json")
                        failed.append(cell.name)
                        continue
                    atomic_write_json(row, d / "result.json")
                finally:
                    lock.release()
                bar.update(1)
                self.write_outputs()
        if skipped:
            self.opts.log(f"held by another process (rerun later to collect them): {', '.join(skipped)}")
        if failed:
            self.opts.log(f"failed (see cells/<cell>/error.json; a rerun retries them): {', '.join(failed)}")
        return self.write_outputs()

    def protocol(self) -> dict:
        """What makes rows comparable; a grid directory holds one protocol."""
        o = self.opts
        return {"scale": o.scale, "seed": o.seed, "sizes": sorted(o.sizes), "sample_steps": o.sample_steps,
                "classifier_max_steps": o.classifier_max_steps, "feature_steps": o.feature_steps,
                "metric_samples": o.metric_samples, "num_classes": o.num_classes,
                "data_dir": str(Path(o.data_dir).resolve()) if o.data_dir else None}

    def _check_protocol(self) -> None:
        path = self.out / "protocol.json"
        mine = self.protocol()
        if path.exists():
            theirs = json.loads(path.read_text())
            diffs = [f"{k}: {theirs.get(k)!r} -> {v!r}" for k, v in mine.items() if theirs.get(k) != v]
            if diffs:
                raise ValueError(f"{self.out} holds a grid made with other settings ({'; '.join(diffs)}): "
                                 "use another --out, or the same settings to resume it")
        else:
            atomic_write_json(mine, path)

    def cell_dir(self, cell: Cell) -> Path:
        return self.out / "cells" / cell.name

    def _plan(self, cell: Cell, make) -> dict:
        """The cell's settings are decided once (a resumed cell keeps its step count and sigma)."""
        path = self.cell_dir(cell) / "plan.json"
        if path.exists():
            return json.loads(path.read_text())
        plan = make()
        plan.update(cell=cell.name, kind=cell.kind, recipe=cell.recipe, command=self.opts.command,
                    commit=self.env["commit"], created=time.strftime("%Y-%m-%d %H:%M:%S"))
        atomic_write_json(plan, path)
        return plan

    def run_cell(self, cell: Cell) -> dict:
        self.opts.log(f"--- cell {cell.name}")
        started = time.perf_counter()
        row = {"generator": self._generator, "dp-sgd-classifier": self._dp_classifier,
               "real-data": self._real_data, "public-only": self._public_only}[cell.kind](cell)
        row.update(cell=cell.name, kind=cell.kind, recipe=cell.recipe,
                   epsilon_target=cell.epsilon if cell.epsilon is not None else math.inf,
                   budget=cell.budget.text if cell.budget else "", scale=self.opts.scale,
                   cell_seconds=round(time.perf_counter() - started, 1), commit=self.env["commit"],
                   device=self.env["device_name"], torch=self.env["torch"], command=self.opts.command,
                   finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        return row

    def _steps_for(self, budget: Budget, key: str, seconds_per_step) -> tuple[int, float | None]:
        """Steps of a cell. A time budget uses one pilot per `key` (recipe, private or not) for the
        whole grid, so cells that differ only in epsilon get the same steps whatever the machine's
        load when each was planned (step time does not depend on epsilon)."""
        if budget.steps is not None:
            return budget.steps, None
        sps = self._pilot(key, seconds_per_step)
        return max(1, int(budget.seconds / sps)), sps

    def _pilot(self, key: str, seconds_per_step) -> float:
        import fcntl

        path = self.out / "pilots.json"
        with open(self.out / "pilots.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)       # one process pilots a key; the others wait for it
            pilots = json.loads(path.read_text()) if path.exists() else {}
            if key not in pilots:
                self.opts.log(f"timing {key} steps on random data (the pilot for every {key} cell)")
                pilots[key] = seconds_per_step()
                atomic_write_json(pilots, path)
        return pilots[key]

    # -- a generator trained by a recipe, then sampled and evaluated
    def _generator(self, cell: Cell) -> dict:
        from dpfast.diffusion.trainer import train

        d = self.cell_dir(cell)
        real_train, test = self.real()
        private = cell.epsilon is not None
        base = self.base_config(cell.recipe).replace(private=private, delta=DELTA)
        if base.subset is not None:
            raise ValueError(f"recipe {cell.recipe}: the utility grid trains on the whole data set (subset=None)")

        def make():
            # the recipe calibrates its own noise for the target (DP-SGD over `steps` steps, or DP-MEPF's
            # one release, whatever the steps): the grid only fixes the target and the step count
            cfg = base.replace(target_epsilon=cell.epsilon if private else None, noise_multiplier=None)
            # real_train is the private data at the recipe's resolution: only its shape and size are used
            recipe = RECIPES[cell.recipe]
            pilot = recipe.pilot or cell.recipe
            key = f"{pilot}:{'private' if private else 'non-private'}"
            budget, extra = cell.budget, {}
            if recipe.public_share and budget.seconds is not None:
                # the public phase's steps cost a non-private step (timed on the same random images)
                public_seconds = recipe.public_share * budget.seconds
                public_steps, public_sps = self._steps_for(
                    Budget(budget.text, seconds=public_seconds), f"{pilot}:public",
                    lambda: pilot_seconds_per_step(cfg.replace(private=False, target_epsilon=None), real_train))
                budget = Budget(budget.text, seconds=budget.seconds - public_seconds)
                cfg = cfg.replace(pretrain_steps=public_steps)
                extra = {"public_steps": public_steps, "public_seconds_per_step": public_sps}
            if recipe.teacher_share and budget.seconds is not None:
                # the teacher's steps cost a DPDM step of the teacher's model (private or not)
                from dpfast.recipes.dp_sad import teacher_config

                tcfg = teacher_config(cfg, 1.0)
                teacher_seconds = recipe.teacher_share * budget.seconds
                teacher_steps, teacher_sps = self._steps_for(
                    Budget(budget.text, seconds=teacher_seconds),
                    f"{pilot}:teacher-{'private' if tcfg.private else 'non-private'}",
                    lambda: pilot_seconds_per_step(tcfg, real_train))
                budget = Budget(budget.text, seconds=budget.seconds - teacher_seconds)
                cfg = cfg.replace(sad_teacher_steps=teacher_steps)
                extra = {"teacher_steps": teacher_steps, "teacher_seconds_per_step": teacher_sps}
            steps, sps = self._steps_for(budget, key, lambda: pilot_seconds_per_step(cfg, real_train))
            cfg = cfg.replace(steps=steps)
            return {"config": cfg.to_dict(), "steps": steps, "pilot_seconds_per_step": sps, **extra,
                    "sample_seed": self.opts.seed + 7,
                    "train_command": f"dpfast train --config {d / 'config.json'} --out {d / 'run'}"}

        plan = self._plan(cell, make)
        cfg = TrainConfig.from_dict(plan["config"])
        atomic_write_json(cfg.to_dict(), d / "config.json")
        result = train(cfg, d / "run", progress=self.opts.progress, log=self.opts.log)
        if result["reason"] in ("SIGINT", "SIGTERM"):
            raise KeyboardInterrupt(f"stopped by {result['reason']} in cell {cell.name} (rerun to resume it)")
        report = result["report"]
        if not report["complete"]:
            raise RuntimeError(f"training stopped at step {report['steps']} of {report['planned_steps']} "
                               f"({result['reason']})")
        evaluation, images, sample_seconds = self._sample_and_evaluate(d, plan["sample_seed"])
        row = self._metrics(evaluation)
        row.update(epsilon=report["epsilon"] if private else math.inf, delta=DELTA if private else "",
                   noise_multiplier=report.get("noise_multiplier") or "", sample_rate=report["sample_rate"],
                   steps=report["steps"],
                   public_steps=sum(p["steps"] for p in report.get("phases", [])  # the denoiser's public phases
                                    if p.get("data") not in (None, "private") and p.get("trainable") != "autoencoder") or "",
                   teacher_steps=(report.get("sad") or {}).get("teacher", {}).get("steps") or "",
                   train_seconds=round(result["train_seconds"], 1),
                   pilot_seconds_per_step=plan["pilot_seconds_per_step"] or "",
                   sample_seconds=sample_seconds,
                   sampler=f"{cfg.sampler} {cfg.sample_steps} steps" if cfg.recipe != "dp-mepf" else "generator",
                   samples=len(images), seed=cfg.seed, release_seconds=round(result.get("release_seconds", 0.0), 1) or "", sample_seed=plan["sample_seed"],
                   noise_seed="os (secret)" if private else "", eval_seed=self.opts.seed,
                   end_to_end=report.get("end_to_end", RECIPES[cell.recipe].end_to_end) if private else "",
                   releases_charged=report.get("releases_charged", ""), planned_command=plan["command"],
                   planned_commit=plan["commit"], train_command=plan["train_command"],
                   guarantee_lost=report.get("guarantee_lost") or "")
        return row

    def _sample_and_evaluate(self, d: Path, seed: int, **draw_options):
        """Samples of the cell's run/ (as many as every row's metrics need), evaluated with the
        grid's protocol; returns (evaluation, images, sampling seconds)."""
        _, test = self.real()
        n = max(max(self.opts.sizes), self.opts.metric_samples)  # every row's feature metrics at one count
        (images, labels), sample_seconds = self._samples(d, n, seed, **draw_options)
        evaluation = ev.evaluate_images(images, labels, test, self.feature_net(), sizes=self.opts.sizes,
                                        max_steps=self.opts.classifier_max_steps, seed=self.opts.seed,
                                        log=self.opts.log, progress=self.opts.progress, device=self.device,
                                        metric_samples=self.opts.metric_samples)
        atomic_write_json(evaluation, d / "evaluation.json")
        return evaluation, images, sample_seconds

    def _samples(self, d: Path, n: int, seed: int, **draw_options):
        import numpy as np

        from dpfast.diffusion.trainer import atomic_write_bytes, draw_batches, load_sampler, to_uint8

        path = d / "samples.npz"
        meta_path = d / "samples.json"
        if path.exists() and meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta["num"] == n:
                return ev.load_samples(path), meta["seconds"]
        draw, meta = load_sampler(d / "run", self.device)
        k = meta["num_classes"]
        labels = torch.arange(n) % k if k else None
        started = time.perf_counter()
        images = to_uint8(draw_batches(draw, n, labels, seed, batch_size=1000, progress=self.opts.progress,
                                       **draw_options))
        seconds = round(time.perf_counter() - started, 1)
        from dpfast.diffusion.public import SAMPLES_MARK

        arrays = {"images": images.numpy(), SAMPLES_MARK: np.array(json.dumps({"cell": d.name}))}
        if labels is not None:
            arrays["labels"] = labels.numpy()
        atomic_write_bytes(path, lambda f: np.savez_compressed(f, **arrays))
        atomic_write_json({"num": n, "seconds": seconds, "seed": seed}, meta_path)
        return (images, labels), seconds

    @staticmethod
    def _metrics(evaluation: dict) -> dict:
        row = {}
        for n, res in evaluation.get("downstream", {}).items():
            row[f"acc_{n}"] = round(res["test_accuracy"], 4)
            row[f"acc_{n}_seconds"] = res["seconds"]
        f = evaluation.get("features")
        if f:
            row.update(fid=round(f["fid"], 3), precision=round(f["precision"], 4),
                       recall=round(f["recall"], 4), feature_metrics_seconds=f["seconds"])
        return row

    # -- baselines
    def _dp_classifier(self, cell: Cell) -> dict:
        from dpfast.accounting import calibrate_noise_multiplier

        real_train, test = self.real()
        settings = CLASSIFIER_DP[self.opts.scale]
        q = min(1.0, settings["batch_size"] / len(real_train))

        def make():
            steps, sps = self._steps_for(cell.budget, "dp-sgd-classifier", lambda: pilot_classifier_seconds_per_step(
                real_train, settings, self.device))
            sigma = calibrate_noise_multiplier(cell.epsilon, DELTA, q, steps=steps, accountant="prv")
            return {"steps": steps, "pilot_seconds_per_step": sps, "noise_multiplier": sigma,
                    "settings": settings}

        plan = self._plan(cell, make)
        started = time.perf_counter()
        model, engine = train_dp_classifier(real_train, plan["noise_multiplier"], plan["steps"],
                                            seed=self.opts.seed, progress=self.opts.progress,
                                            device=self.device, **settings)
        train_seconds = round(time.perf_counter() - started, 1)
        acc = ev.accuracy(model, test.images, test.labels)   # the real test set, touched once
        eps = engine.get_epsilon(DELTA)
        self.opts.log(f"DP-SGD classifier on the real data: test accuracy {acc:.4f} at epsilon {eps:.3f}")
        return {"acc_direct": round(acc, 4), "epsilon": eps, "delta": DELTA,
                "noise_multiplier": plan["noise_multiplier"], "sample_rate": q, "steps": plan["steps"],
                "train_seconds": train_seconds, "pilot_seconds_per_step": plan["pilot_seconds_per_step"] or "",
                "seed": self.opts.seed, "noise_seed": "os (secret)", "end_to_end": True,
                "samples": len(real_train), "planned_command": plan["command"], "planned_commit": plan["commit"]}

    def _public_only(self, cell: Cell) -> dict:
        """The pre-trained public model, sampled without any private training: what pre-training alone
        gives (epsilon 0: the private data is only touched by the evaluation)."""
        import shutil

        from dpfast.diffusion.finetune import resolve_init_from

        d = self.cell_dir(cell)
        (d / "run").mkdir(parents=True, exist_ok=True)
        if not (d / "run" / "model.pt").exists():
            shutil.copyfile(resolve_init_from(PUBLIC_ONLY_MODEL), d / "run" / "model.pt")
        # sampled like the DPDM rows (the shipped model's own config says 25 steps, the grid's DPDM 10)
        steps = self.opts.sample_steps or RECIPES["dpdm"].config(self.opts.scale).sample_steps
        evaluation, images, sample_seconds = self._sample_and_evaluate(d, self.opts.seed + 7, num_steps=steps)
        row = self._metrics(evaluation)
        row.update(epsilon=0.0, sampler=f"ddim {steps} steps", samples=len(images), sample_seconds=sample_seconds, steps=0,
                   train_command=f"dpfast pretrain --preset pretrain-demo14 (shipped as {PUBLIC_ONLY_MODEL})",
                   end_to_end=True, eval_seed=self.opts.seed)
        return row

    def _real_data(self, cell: Cell) -> dict:
        real_train, test = self.real()
        evaluation = ev.evaluate_images(real_train.images, real_train.labels, test, self.feature_net(),
                                        sizes=self.opts.sizes, max_steps=self.opts.classifier_max_steps,
                                        seed=self.opts.seed, log=self.opts.log, progress=self.opts.progress,
                                        device=self.device, metric_samples=self.opts.metric_samples)
        atomic_write_json(evaluation, self.cell_dir(cell) / "evaluation.json")
        row = self._metrics(evaluation)
        row.update(epsilon=math.inf, samples=len(real_train), eval_seed=self.opts.seed)
        return row

    # -- outputs
    def rows(self) -> list[dict]:
        """Every finished cell of --out (one protocol), this grid's and earlier runs' (a run with other
        recipes or epsilons adds rows), by epsilon, generators first, then recipe."""
        rows = [json.loads(p.read_text()) for p in sorted((self.out / "cells").glob("*/result.json"))]
        return sorted(rows, key=lambda r: (r["epsilon_target"], r["kind"] != "generator", r["recipe"]))

    def write_outputs(self) -> list[dict]:
        rows = self.rows()
        write_csv(rows, self.out / "results.csv", self.opts.sizes)
        write_markdown(rows, self.out / "results.md", self.opts, self.env)
        if self.opts.plots and rows:
            plot_accuracy(rows, self.out / "accuracy_vs_epsilon.png", self.opts.sizes)
        return rows


# ----------------------------------------------------------------------------- writers
def _columns(sizes) -> list[str]:
    accs = [c for n in sorted(sizes) for c in (f"acc_{n}", f"acc_{n}_seconds")]
    return ["cell", "kind", "recipe", "epsilon_target", "epsilon", "delta", "budget", "steps", "public_steps",
            "teacher_steps", "noise_multiplier", "sample_rate", "train_seconds", "pilot_seconds_per_step", "release_seconds", "samples",
            "sampler", "sample_seconds", *accs, "acc_direct", "fid", "precision", "recall",
            "feature_metrics_seconds", "end_to_end", "releases_charged", "guarantee_lost", "seed",
            "sample_seed", "noise_seed", "eval_seed", "scale", "cell_seconds", "device", "torch", "commit",
            "finished", "command", "planned_commit", "planned_command", "train_command"]


def write_csv(rows: list[dict], path: Path, sizes) -> None:
    import io

    cols = _columns(sizes)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c, "") for c in cols})
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue().encode()))


def _f(x, spec=".3f") -> str:
    if x in ("", None):
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return format(x, spec)


def headline_accuracy(row: dict, sizes) -> tuple[float | None, int | None]:
    """The accuracy at the largest size the row has (or the DP-SGD classifier's direct one)."""
    if row.get("acc_direct") not in (None, ""):
        return row["acc_direct"], None
    for n in sorted(sizes, reverse=True):
        if row.get(f"acc_{n}") not in (None, ""):
            return row[f"acc_{n}"], n
    return None, None


def _size(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def _label(row: dict) -> str:
    if row["kind"] == "real-data":
        return "real data (classifier ceiling)"
    if row["kind"] == "dp-sgd-classifier":
        return "DP-SGD classifier on real data"
    if row["kind"] == "public-only":
        return "public pre-training only (builtin:demo14, no private data)"
    if row["epsilon_target"] == math.inf:
        return row["recipe"] + " (no privacy)"
    try:  # a run that spent an infinite epsilon at a finite target (a recipe's non-DP part, a lost guarantee)
        lost = float(row.get("epsilon")) == math.inf
    except (TypeError, ValueError):
        lost = False
    return row["recipe"] + (" (NOT DP: epsilon infinite)" if lost else "")


def write_markdown(rows: list[dict], path: Path, opts: Options, env: dict) -> None:
    sizes = sorted(opts.sizes)
    lines = ["# dpfast bench --utility", "",
             f"- device: {env['device_name']}; torch {env['torch']}; commit {env['commit']} (this run; each row's "
             "device and commit are in results.csv)",
             f"- data: {opts.data_dir or 'Fashion-MNIST (Debian dataset-fashion-mnist)'}; scale {opts.scale}; "
             f"delta {DELTA:g}",
             "- downstream accuracy: DPDM's CNN trained on n synthetic images (selection on a synthetic "
             "validation split), real test set touched once; the DP-SGD classifier's is its final model's",
             "- FID / precision / recall: feature space of a CNN trained on the real training set "
             f"(not Inception), {opts.metric_samples} samples vs the real test set. That CNN is trained without privacy: "
             "the feature metrics are an evaluation of private data, not covered by epsilon, and not "
             "to be released as such",
             f"- command: `{opts.command}`" if opts.command else "", ""]
    head = ["method", "ε target", "ε spent", "budget", "steps", "σ", "train s",
            *[f"acc@{_size(n)}" for n in sizes], "direct acc", "FID", "prec.", "recall", "sample s",
            "end to end", "machine"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            _label(r), _f(r.get("epsilon_target"), "g"), _f(r.get("epsilon"), ".3f"), r.get("budget") or "—",
            str(r.get("steps", "—")) + (f" (+{r['public_steps']} public)" if r.get("public_steps") else "")
            + (f" (+{r['teacher_steps']} teacher)" if r.get("teacher_steps") else ""),
            _f(r.get("noise_multiplier"), ".3f"), _f(r.get("train_seconds"), ".0f"),
            *[_f(r.get(f"acc_{n}"), ".3f") for n in sizes], _f(r.get("acc_direct"), ".3f"),
            _f(r.get("fid"), ".2f"), _f(r.get("precision"), ".3f"), _f(r.get("recall"), ".3f"),
            _f(r.get("sample_seconds"), ".0f"), str(r.get("end_to_end", "")) or "—",
            (r.get("device") or "—").replace("(R)", "").split(" Processor")[0]]) + " |")
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def plot_accuracy(rows: list[dict], path: Path, sizes) -> None:
    """Downstream accuracy against epsilon: a line per recipe and budget, the DP-SGD classifier,
    and each non-private generator (dashed, in its recipe's colour) and real data (grey) as
    horizontal references."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = {}

    def colour(name):
        return colours.setdefault(name, f"C{len(colours)}")
    private = [r for r in rows if r["epsilon_target"] != math.inf and r["kind"] != "public-only"]
    eps_values = sorted({r["epsilon_target"] for r in private}) or [1.0, 10.0]
    for key in dict.fromkeys((r["recipe"], _label(r), r.get("budget")) for r in private):
        pts = sorted((r["epsilon_target"], headline_accuracy(r, sizes)[0]) for r in private
                     if (r["recipe"], _label(r), r.get("budget")) == key and headline_accuracy(r, sizes)[0] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colour(key[0]),
                    label=f"{key[1]}, {key[2]}")
    for r in rows:
        if r["epsilon_target"] == math.inf or r["kind"] == "public-only":
            acc = headline_accuracy(r, sizes)[0]
            if acc is not None:
                real = r["kind"] in ("real-data", "public-only")
                ax.axhline(acc, linestyle=":" if real else "--", linewidth=1.2,
                           color=("grey" if r["kind"] == "real-data" else "black") if real else colour(r["recipe"]),
                           label=_label(r) + (f", {r['budget']}" if r.get("budget") else ""))
    ax.set_xscale("log")
    ax.set_xticks(eps_values, [f"{e:g}" for e in eps_values])
    ax.minorticks_off()
    ax.set_xlabel("epsilon (delta = 1e-5)")
    ax.set_ylabel(f"downstream accuracy (n = {max(sizes):,})")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("real test accuracy of a CNN trained on synthetic data (DP-SGD classifier: on real data)",
                 fontsize=8)
    fig.tight_layout()
    atomic_write_bytes(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------- command line
def add_arguments(p) -> None:
    g = p.add_argument_group("utility benchmark (with --utility)")
    g.add_argument("--recipes", default="all", help=f"comma list of {', '.join(RECIPES)} or 'all' (default: all)")
    g.add_argument("--epsilons", default="1,10", help="target epsilons at delta=1e-5 (default: 1,10)")
    g.add_argument("--budget", default="10m",
                   help="comma list: training seconds ('10m', '600s') or steps ('300steps') per cell (default: 10m)")
    g.add_argument("--baselines", default="all",
                   help="comma list of dp-sgd-classifier, real-data, public-only; 'all' or 'none' (default: all)")
    g.add_argument("--no-nonprivate", action="store_true",
                   help="leave out each recipe's non-private generator cell")
    g.add_argument("--scale", choices=("cpu", "paper"), default="cpu",
                   help="cpu: the demo's 14x14 U-Net; paper: DPDM's 28x28 configuration, for a GPU (default: cpu)")
    g.add_argument("--sizes", default=",".join(map(str, ev.SIZES)),
                   help="downstream training-set sizes (default: 2000,10000,50000)")
    g.add_argument("--data-dir", default=None, help="private data (default: Fashion-MNIST from Debian)")
    g.add_argument("--num-classes", type=int, default=None,
                   help="the public number of classes (needed for IDX files other than Fashion-MNIST)")
    g.add_argument("--threads", type=int, default=1, help="CPU threads per process (default: 1; run the "
                   "same command in several terminals to use more cores)")
    g.add_argument("--sample-steps", type=int, default=None, help="sampler steps (default: the recipe's)")
    g.add_argument("--classifier-max-steps", type=int, default=ev.CLASSIFIER_MAX_STEPS,
                   help=f"cap of the downstream CNN's optimiser steps (default: {ev.CLASSIFIER_MAX_STEPS})")


def run_from_args(args) -> int:
    import shlex

    def floats(text):
        return [float(x) for x in text.split(",") if x.strip()]

    try:
        recipes = list(RECIPES) if args.recipes == "all" else [x.strip() for x in args.recipes.split(",") if x.strip()]
        bad = [r for r in recipes if r not in RECIPES]
        if bad:
            raise ValueError(f"unknown recipe {bad[0]!r}; choose from {', '.join(RECIPES)}")
        epsilons = floats(args.epsilons)
        if any(not (e > 0 and math.isfinite(e)) for e in epsilons):
            raise ValueError("--epsilons must be positive and finite (the non-private generator is always in)")
        budgets = [parse_budget(b) for b in args.budget.split(",") if b.strip()]
        named = {"all": BASELINES, "none": ()}
        baselines = named[args.baselines] if args.baselines in named else tuple(
            x.strip() for x in args.baselines.split(",") if x.strip())
        bad = [b for b in baselines if b not in BASELINES]
        if bad:
            raise ValueError(f"unknown baseline {bad[0]!r}; choose from {', '.join(BASELINES)}")
        sizes = tuple(int(x) for x in args.sizes.split(",") if x.strip())
        if not sizes or min(sizes) < 10:
            raise ValueError("--sizes needs sizes of at least 10")
        for name in ("threads", "sample_steps", "classifier_max_steps"):
            value = getattr(args, name)
            if value is not None and value < (0 if name == "classifier_max_steps" else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be "
                                 f"{'>= 0' if name == 'classifier_max_steps' else '>= 1'}, got {value}")
        for r in recipes:
            RECIPES[r].config(args.scale)
        ev.load_dataset(args.data_dir, "train")        # a missing data set is reported before any work
    except (ValueError, FileNotFoundError) as e:
        print(f"dpfast bench --utility: {e}", file=sys.stderr)
        return 2
    out = args.out or Path("benchmarks") / "results" / f"utility-{args.scale}"
    argv = sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]
    opts = Options(out=Path(out), data_dir=args.data_dir, scale=args.scale, sizes=sizes, seed=args.seed,
                   num_classes=args.num_classes,
                   threads=args.threads, sample_steps=args.sample_steps, device=args.device,
                   classifier_max_steps=args.classifier_max_steps or None, progress=not args.no_progress,
                   plots=not args.no_plots, command="dpfast bench " + " ".join(map(shlex.quote, argv)))
    grid = Grid(plan_cells(recipes, epsilons, budgets, baselines, nonprivate=not args.no_nonprivate), opts)
    try:
        grid.run()
    except ValueError as e:          # another protocol in --out: said before any work
        print(f"dpfast bench --utility: {e}", file=sys.stderr)
        return 2
    print((grid.out / "results.md").read_text())
    return 0
