"""The diffusion training job behind `dpfast train`: DP-SGD (or non-private) training of an EDM
denoiser with checkpoints that resume exactly, sample grids, and a privacy report.

Layout of an output directory:
    config.json           the resolved TrainConfig
    checkpoint.pt         model, EMA, optimizer, engine (accountant, Poisson sampler position, noise
                          seed and step), the loss's noise generator and the global RNG; written
                          atomically (temp file + os.replace), so a killed run loses at most one interval.
                          It holds the engine's noise seed: keep it as secret as the data.
    model.pt              EMA weights + what `dpfast sample` needs (no secrets), at the end of the run
    privacy_report.json   epsilon spent so far, delta, adjacency, sigma, q, steps, accountant
    privacy_ledger.jsonl  one line per release, written before it happens (dpfast.ledger): resuming from
                          an older checkpoint charges the releases after it and uses fresh noise keys
    samples/step_*.png    sample grids during training; samples.png at the end

Running the same command again on the same --out resumes from checkpoint.pt. A resumed run is
bit-for-bit the run that was never interrupted (on CPU; on GPU up to kernel nondeterminism).
"""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from .augment import make_augment
from .data import ImageDataset, load_dataset
from .edm import EDMPrecond, edm_loss_rows
from .ema import EMA
from .phases import phase_starts, plan_phases
from .presets import RUN_CONTROL_FIELDS, ConfigError, TrainConfig
from .samplers import sample_images
from .unet import DDPMpp, count_parameters


# ----------------------------------------------------------------------------- small helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def atomic_write_bytes(path: Path, write, secret: bool = False) -> None:
    """Calls write(file) on a temp file in path's directory, then renames it over path, so a reader
    (or a run killed mid-write) sees either the old file or the new one, never half of one.
    A secret file stays readable by its owner only (mkstemp's 0600); others get 0644."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    if not secret:
        os.chmod(tmp, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: Path, secret: bool = False) -> None:
    atomic_write_bytes(path, lambda f: torch.save(obj, f), secret)


def public_config(cfg: TrainConfig) -> dict:
    """The config as written next to the released model (config.json, model.pt): a pinned noise seed
    (--noise-seed) is withheld, since anyone holding it can regenerate the DP noise and the Poisson
    batches. The checkpoint (owner-only) keeps it for resuming. ``adopt_copied_run`` is an answer for one
    resume, never a setting: written here, ``--config OUT/config.json`` would adopt every later copy;
    ``deterministic_resume`` (keep the checkpoint's noise key) likewise holds for one resume only."""
    return {**cfg.to_dict(), "noise_seed": None, "adopt_copied_run": False, "deterministic_resume": False}


def atomic_write_json(obj, path: Path) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_grid(images: torch.Tensor, path: Path, nrow: int, row_labels: list[str] | None = None) -> None:
    """images: (N, C, H, W) in [-1, 1] -> a PNG grid with nrow images per row and a 2-pixel border.
    Images under 28 pixels are enlarged (nearest neighbour) so that a grid stays easy to look at.
    row_labels: a name written left of each row (the class of a one-class-per-row grid)."""
    from PIL import Image, ImageDraw

    scale = max(1, 28 // images.shape[-1])
    if scale > 1:
        images = images.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    pad = 2
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), -1.0)
    for i, img in enumerate(images):
        top, left = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        grid[:, top:top + h, left:left + w] = img
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = arr[0].numpy() if c == 1 else arr.permute(1, 2, 0).numpy()
    picture = Image.fromarray(arr)
    if row_labels:
        margin = 7 * max(len(t) for t in row_labels) + 8
        labelled = Image.new(picture.mode, (picture.width + margin, picture.height), 0)
        labelled.paste(picture, (margin, 0))
        draw = ImageDraw.Draw(labelled)
        fill = 255 if picture.mode == "L" else (255, 255, 255)
        for r, text in enumerate(row_labels[:rows]):
            draw.text((4, pad + r * (h + pad) + h // 2 - 5), text, fill=fill)
        picture = labelled
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda f: picture.save(f, format="PNG"))


def class_names(cfg: TrainConfig, num_classes: int) -> list[str]:
    """Names for a grid's rows: Fashion-MNIST's (public), else "class k"."""
    from .data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR

    fashion = cfg.data_dir is None or Path(cfg.data_dir).resolve() == Path(FASHION_MNIST_DIR).resolve()
    if fashion and cfg.recipe != "pretrain" and num_classes == len(FASHION_MNIST_CLASSES):
        return list(FASHION_MNIST_CLASSES)
    return [f"class {k}" for k in range(num_classes)]


def grid_row_labels(cfg: TrainConfig, num_classes: int) -> list[str] | None:
    """The row names of a training grid (grid_labels: one class per row)."""
    if grid_labels(cfg, num_classes) is None:
        return None
    names = class_names(cfg, num_classes)
    return [names[r % num_classes] for r in range(cfg.grid_size)]


def build_denoiser(cfg: TrainConfig, image_shape, num_classes: int) -> EDMPrecond:
    """The run's EDM denoiser, with LoRA adapters when cfg.trainable is lora:R[+conv]."""
    from .finetune import add_lora, parse_trainable

    c, h, w = image_shape
    if h != w:
        raise ValueError(f"the U-Net needs square images, got {h}x{w}")
    net = DDPMpp(image_size=h, in_channels=c, num_classes=num_classes if cfg.class_conditional else 0,
                 nf=cfg.nf, ch_mult=tuple(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                 attn_resolutions=tuple(cfg.attn_resolutions), dropout=cfg.dropout,
                 embedding_type=cfg.embedding_type)
    kind, rank, convs = parse_trainable(cfg.trainable)
    if kind == "lora":
        add_lora(net, rank, convs)
    return EDMPrecond(net, sigma_data=cfg.sigma_data)


def prepare_dataset(cfg: TrainConfig, dataset: ImageDataset | None = None) -> ImageDataset:
    """The run's private training set: cfg.data_dir (or `dataset`), its subset and resolution."""
    if dataset is None:
        dataset = load_dataset(cfg.data_dir, "train", channels=cfg.folder_channels)
    if cfg.subset is not None:
        dataset = dataset.subset(cfg.subset)
    if cfg.resolution is not None:
        dataset = dataset.downsample(cfg.resolution)
    if cfg.num_classes is not None:
        if cfg.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {cfg.num_classes}")
        dataset = ImageDataset(dataset.images, dataset.labels, cfg.num_classes, dataset.name)
    if cfg.private and cfg.class_conditional and not dataset.classes_declared:
        raise ConfigError(f"the number of classes of {dataset.name or 'the data'} would be read off its labels "
                          "(labels.max() + 1), which is private: a class-conditional model would reveal it. Pass "
                          "--num-classes N (the public number of classes), or --no-class-conditional")
    # curator-side input validation, before any privacy is spent (what a release sees is unaffected)
    if dataset.num_classes and len(dataset) and not (0 <= int(dataset.labels.min())
                                                      and int(dataset.labels.max()) < dataset.num_classes):
        raise ConfigError(f"labels of {dataset.name or 'the data'} must lie in [0, {dataset.num_classes})")
    return dataset


def total_steps_of(cfg: TrainConfig, dataset_size: int) -> int:
    """Logical steps of the run: cfg.steps, or epochs / q (expected passes over the data under
    Poisson sampling, the accountant's definition)."""
    if cfg.steps is not None:
        return int(cfg.steps)
    from dpfast.accounting.calibrate import steps_from_epochs

    return steps_from_epochs(cfg.epochs, sample_rate_of(cfg, dataset_size))


def sample_rate_of(cfg: TrainConfig, dataset_size: int) -> float:
    return min(1.0, cfg.batch_size / dataset_size)


def grid_labels(cfg: TrainConfig, num_classes: int) -> torch.Tensor | None:
    if num_classes == 0 or not cfg.class_conditional:
        return None
    n = cfg.grid_size * cfg.grid_size
    return (torch.arange(n) // cfg.grid_size) % num_classes  # one row per class


def _check_resumable(saved: TrainConfig, cfg: TrainConfig) -> TrainConfig:
    """The resumed run keeps the checkpoint's config; only run-control fields may change. A run made
    before --num-classes existed (num_classes none) may declare it on resume."""
    if saved.num_classes is None and cfg.num_classes is not None:
        saved = saved.replace(num_classes=cfg.num_classes)
    diffs = [f"{k}: {getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in saved.to_dict()
             if k not in RUN_CONTROL_FIELDS and getattr(saved, k) != getattr(cfg, k)]
    if diffs:
        raise ConfigError("the output directory holds a run with a different configuration ("
                          + "; ".join(diffs) + "). Use another --out, or the same settings to resume it.")
    return saved.replace(**{k: getattr(cfg, k) for k in RUN_CONTROL_FIELDS})


class OutLock:
    """One process trains in an output directory: an exclusive flock on out/.lock, dropped by the
    kernel when the process dies. Two processes resuming one checkpoint would release the same noise
    keys on different batches."""

    def __init__(self, out: Path):
        import fcntl

        self._f = open(Path(out) / ".lock", "a+")
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.close()
            raise ConfigError(f"another process is training in {out}; wait for it or use another --out") from None

    def release(self) -> None:
        if not self._f.closed:
            self._f.close()


class _StopOnSignal:
    """SIGINT / SIGTERM during training ask for a stop at the next logical-step boundary, so the
    final checkpoint is consistent (a signal in the middle of a step would leave a half-consumed
    Poisson batch). A second signal acts as usual (KeyboardInterrupt / termination)."""

    def __init__(self):
        self.received = None
        self._old = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signum, self._old[signum])  # the next one is not caught

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, out_dir: str | os.PathLike, dataset: ImageDataset | None = None,
                 progress: bool = True, log=print):
        self.started = time.monotonic()  # --time-budget counts from here (setup included)
        from dpfast.launch import init_distributed_from_env

        # under torchrun: one process per GPU (gloo on CPU); otherwise a no-op with rank 0 of 1
        self.dist = init_distributed_from_env()
        self.is_main = self.dist.rank == 0
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.log = log if self.is_main else (lambda *a, **k: None)
        self.progress = progress and self.is_main
        self.resume_state = None
        self.lock = OutLock(self.out) if self.is_main else None
        if self.ckpt_path.exists():
            self.resume_state = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
            cfg = _check_resumable(TrainConfig.from_dict(self.resume_state["config"]), cfg)
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        if self.dist.world_size > 1:
            if not cfg.private or cfg.recipe in ("pretrain", "dp-ldm", "dp-sad") or cfg.pretrain_steps:
                raise ValueError("multi-process training is supported for private runs only (pre-train in one "
                                 "process with dpfast pretrain, then fine-tune with --init-from)")
            if self.device.type == "cuda":
                self.device = self.dist.device  # this rank's GPU (LOCAL_RANK)

        self.public = None  # the public data set, loaded when a phase needs it
        # the file-system paths of the public data, resolved in every session (a resumed run started
        # from another directory may resolve a relative path elsewhere): model.pt records them all
        from .public import check_disjoint, source_paths

        self.public_paths = source_paths(cfg.public_data) + list(
            (self.resume_state or {}).get("public_paths", []))
        # at every start, before anything is loaded or reused: a resume may name another --data-dir, and
        # models cached in --out (dp-ldm's autoencoder) skip the check that loading public data makes
        check_disjoint(self.public_paths, cfg.data_dir)
        if cfg.recipe == "pretrain":  # public data only: the private data set is never opened
            self.dataset = None
            self.image_shape = (cfg.channels, cfg.resolution, cfg.resolution)
            self.num_classes = (cfg.num_classes or self._public_data().num_classes) if cfg.class_conditional else 0
            self.q = None
            self.phases = plan_phases(cfg, 0)
        else:
            self.dataset = dataset = self._prepare_data(dataset)
            self.image_shape = dataset.image_shape
            self.num_classes = dataset.num_classes if cfg.class_conditional else 0
            size = self._public_size(dataset)
            self.q = sample_rate_of(cfg, size)
            self.phases = plan_phases(cfg, total_steps_of(cfg, size))
        self.private_phase = next((p for p in self.phases if p.private), None)
        self.total_steps = sum(p.steps for p in self.phases)
        if self.private_phase is not None and cfg.dropout > 0:
            # nn.Dropout draws its masks for the whole batch from the global RNG in batch order, so one
            # record's presence would move every later record's mask (see dpfast.random.record_generators)
            raise ConfigError(f"--dropout {cfg.dropout} with DP training: dropout masks are drawn in batch order "
                              "from one stream, so a record's presence changes the other records' gradients "
                              "and the clipped sum's sensitivity bound fails; use --dropout 0")

        torch.manual_seed(cfg.seed)
        self.denoiser = build_denoiser(cfg, self.image_shape, self.num_classes).to(self.device)
        self.init_source = None
        if cfg.init_from is not None:
            self.init_source = self._init_from(cfg.init_from)
        # A plain copy for sampling with EMA weights, made before the engine touches the model.
        self.sample_model = copy.deepcopy(self.denoiser).eval()
        self.ema = EMA(self.denoiser, cfg.ema_decay)
        # the diffusion noise, noise levels, label dropout and augmentations of this rank's rows: one
        # stream per rank (a shared stream would give every rank's samples the same noise)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1 + 1_000_003 * self.dist.rank)
        self.augment = make_augment(cfg.augment, cfg.crop_padding, self.gen)
        self.step = 0
        self.elapsed = 0.0  # training seconds over all invocations
        self.engine = None
        self.noise_multiplier = None
        if self.private_phase is not None:  # calibrated now: before any data is read for training
            self.noise_multiplier = self._noise_multiplier()
        self.phase = None
        saved_phase = 0 if self.resume_state is None else self.resume_state.get("phase", 0)
        self._enter_phase(saved_phase, fresh=self.resume_state is None)
        if self.resume_state is not None:
            self._load(self.resume_state)

    # -- setup (recipes override the three data hooks: dpfast.recipes.dp_ldm trains in a latent space)
    def _public_size(self, dataset) -> int:
        """The data set size q = batch_size / size and an epochs budget's steps are computed from: the
        size is treated as public (the README's "The data set's size"). The black-box audit
        (dpfast.audit_input) fixes it before its canary coins are drawn."""
        return len(dataset)

    def _prepare_data(self, dataset):
        """The private training set as the model sees it."""
        return prepare_dataset(self.cfg, dataset)

    def _load_public(self):
        """The public data set as the model sees it (at the model's image shape)."""
        from .public import load_public

        return load_public(self.cfg.public_data, self.image_shape, private_dir=self.cfg.data_dir)

    def _to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model samples -> images in [-1, 1]."""
        return x

    def _model_extra(self) -> dict:
        """Recipe-specific entries of model.pt."""
        return {}

    def _checkpoint_extra(self) -> dict:
        """Recipe-specific entries of checkpoint.pt (restored by _load_extra)."""
        return {}

    def _load_extra(self, state: dict) -> None:
        pass

    def _sampling_model(self):
        """The denoiser the sample grids use (the EMA model; dp-syngen adds its stage experts)."""
        return self.ema_model()

    def _public_data(self):
        if self.public is None:
            self.public = self._load_public()
        return self.public

    def _init_from(self, source: str) -> dict:
        """Loads the pre-trained model's EMA weights (before any training, on a fresh run only; a
        resumed run's checkpoint holds them). Refuses a model that saw private data: its privacy cost
        would not be part of this run's epsilon."""
        from .finetune import check_compatible, load_base_weights, load_pretrained, resolve_init_from
        from .public import check_overlap, is_named

        state = load_pretrained(source)
        if not state.get("public_only", False):
            raise ConfigError(f"--init-from {source}: that model was trained on private data (or by an older "
                              "dpfast that did not record it), and its privacy cost would not be counted in this "
                              "run's epsilon. Fine-tune from a `dpfast pretrain` model (public data only)")
        named = all(is_named(p) for p in str(state["config"].get("public_data", "")).split("+") if p)
        if "public_paths" not in state and not named:
            raise ConfigError(f"--init-from {source}: the model does not record the paths of its public data "
                              "(an older dpfast): pre-train it again")
        for used in state.get("public_paths") or []:  # its public data must not be this run's private data
            try:
                check_overlap(used, self.cfg.data_dir)
            except ValueError as e:
                raise ConfigError(f"--init-from {source}: the model was pre-trained on {used}, which overlaps this "
                                  f"run's private data ({e})") from None
        check_compatible(state, self.cfg, self.image_shape, self.num_classes, source)
        if self.resume_state is None:
            load_base_weights(self.denoiser, state["ema"], source)
        return {"init_from": source, "file": str(resolve_init_from(source)),
                "public_data": state.get("public_data"), "steps": state.get("step"),
                "private_data_used": False}

    def _noise_multiplier(self) -> float:
        cfg = self.cfg
        saved = self.resume_state
        if saved is not None and saved.get("noise_multiplier") is not None:
            return float(saved["noise_multiplier"])
        if cfg.noise_multiplier is not None:
            return float(cfg.noise_multiplier)
        if cfg.target_epsilon is None:
            raise ValueError("a private run needs target_epsilon or noise_multiplier")
        from dpfast.accounting import calibrate_noise_multiplier

        return float(calibrate_noise_multiplier(cfg.target_epsilon, cfg.delta, self.q,
                                                steps=self.private_phase.steps, accountant=cfg.accountant,
                                                history=self._prior_history()))

    def _prior_history(self) -> list:
        """Releases on the private data before this run's private phase, spent from the same target
        (dp-sad: its teacher's): the private phase's noise is calibrated for what they left."""
        return []

    def _enter_phase(self, index: int, fresh: bool) -> None:
        """Starts phase `index`: its trainable parameters, a new optimizer over them, a new EMA, and
        for a private phase the engine. fresh=False when a checkpoint of this phase is loaded next."""
        from .finetune import select_trainable

        phase = self.phases[index]
        if fresh and self.phase is not None:
            # the next phase starts from the last one's EMA weights, as --init-from starts from a
            # pre-trained model's
            self.ema.copy_to(self.denoiser)
        self.phase_index, self.phase = index, phase
        select_trainable(self.denoiser, phase.trainable)
        self.ema = EMA(self.denoiser, self.cfg.ema_decay)
        base_opt = torch.optim.Adam([p for p in self.denoiser.parameters() if p.requires_grad], lr=self.cfg.lr)
        if phase.private:
            if self.engine is not None:
                raise RuntimeError("one private phase per run")  # plan_phases makes one
            self._make_private(base_opt, resume=not fresh and self.resume_state is not None
                               and self.resume_state.get("engine") is not None)
        else:
            self.optimizer = base_opt
            data = self._public_data() if phase.public else self.dataset
            self._phase_data = data
            self._phase_q = min(1.0, self.cfg.batch_size / len(data))
            if phase.public and self.num_classes and data.num_classes > self.num_classes:
                raise ConfigError(f"public data {self.cfg.public_data} has {data.num_classes} classes, the model "
                                  f"{self.num_classes}: pre-train unconditionally or on data with at most "
                                  f"{self.num_classes} classes")

    def _make_private(self, base_opt, resume: bool) -> None:
        from torch.utils.data import DataLoader

        from dpfast import PrivacyEngine

        cfg = self.cfg
        saved = self.resume_state
        sigma = self.noise_multiplier
        seed = saved["engine"]["seed"] if resume else cfg.noise_seed
        # The engine's seed keys the Poisson sampler and the DP noise. It is drawn from the OS unless
        # the config pins it (tests): a public seed would let anyone subtract the noise.
        self.engine = PrivacyEngine(accountant=cfg.accountant, seed=seed, ledger=self.out / "privacy_ledger.jsonl",
                                    adopt_copied_ledger=cfg.adopt_copied_run,
                                    deterministic_resume=cfg.deterministic_resume)
        if resume:  # before make_private: the ledger is checked against the checkpoint
            try:
                self.engine.load_state_dict(saved["engine"])
            except ValueError as e:  # refused before anything was released: one line, as any refused setting
                raise ConfigError(f"cannot resume {self.out / 'checkpoint.pt'}: {e}") from e
        loader = DataLoader(self.dataset, batch_size=cfg.batch_size,
                            pin_memory=self.device.type == "cuda")
        self.model, self.optimizer, self.loader = self.engine.make_private(
            module=self.denoiser, optimizer=base_opt, data_loader=loader, noise_multiplier=sigma,
            max_grad_norm=cfg.max_grad_norm, multiplicity=cfg.multiplicity, poisson_sampling=True,
            max_physical_batch_size=cfg.max_physical_batch_size, loss_reduction="mean",
            mode=cfg.mode, backend=cfg.backend, sample_rate=self.q,
            # the loader above holds the global batch, on one process or many: its size is the divisor
            expected_batch_size=float(cfg.batch_size))
        self._phase_data, self._phase_q = self.dataset, self.q

    def _load(self, state: dict) -> None:
        if self.engine is not None and self.engine.accountant.steps > self.engine.prior_steps \
                and not state.get("record_randomness"):
            # releases made before 2026-12-03 drew the loss's randomness for the whole batch in batch
            # order, so one record moved the clipped sum by more than C: their epsilon does not hold
            self.engine._lose_privacy("this run's earlier releases were made by a dpfast train that drew the "
                                      "loss's randomness in batch order (before per-record keys), so one record "
                                      "could move the clipped sum by more than max_grad_norm; start a new run")
        self.denoiser.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        rng = state["loss_rng"]
        if isinstance(rng, list):  # one state per rank (a multi-process run)
            if len(rng) == self.dist.world_size:
                self.gen.set_state(rng[self.dist.rank])
            else:
                warnings.warn(f"resuming a {len(rng)}-process run on {self.dist.world_size} processes: the "
                              "diffusion-noise streams restart (the DP sampler and noise are unaffected)")
        else:
            self.gen.set_state(rng)
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.step = state["step"]
        self.elapsed = state["elapsed"]
        self._load_extra(state)

    # -- outputs
    def _loss_rng_state(self):
        if self.dist.world_size == 1:
            return self.gen.get_state()
        states = [None] * self.dist.world_size
        torch.distributed.all_gather_object(states, self.gen.get_state().cpu())
        return states

    def save_checkpoint(self) -> None:
        """Written by rank 0 only (all ranks hold the same model, optimizer and engine state); every
        rank waits until it is complete."""
        loss_rng = self._loss_rng_state()
        if not self.is_main:
            self._barrier()
            return
        state = {"config": self.cfg.to_dict(), "step": self.step, "elapsed": self.elapsed,
                 "phase": self.phase_index, "phase_name": self.phase.name,
                 "public_paths": sorted(set(self.public_paths)),
                 "image_shape": list(self.image_shape),
                 "model": self.denoiser.state_dict(), "ema": self.ema.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "loss_rng": loss_rng,
                 "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                 "engine": self.engine.state_dict() if self.engine is not None else None,
                 "noise_multiplier": self.noise_multiplier,
                 "record_randomness": 1,  # private steps draw each record's randomness from its own key
                 **self._checkpoint_extra()}
        atomic_torch_save(state, self.ckpt_path, secret=True)  # holds the engine's noise seed
        self._barrier()

    def _barrier(self) -> None:
        if self.dist.world_size > 1:
            torch.distributed.barrier()

    def _agree(self, stop: bool) -> bool:
        """A stop decided by one rank (time budget, signal) is taken by all, at the same step."""
        if self.dist.world_size == 1:
            return stop
        flag = torch.tensor([1.0 if stop else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def ema_model(self) -> EDMPrecond:
        return self.ema.copy_to(self.sample_model)

    def save_model(self) -> Path:
        path = self.out / "model.pt"
        atomic_torch_save({"config": public_config(self.cfg), "step": self.step,
                           "image_shape": list(self.image_shape), "num_classes": self.num_classes,
                           "ema": self.ema_model().state_dict(), **self._provenance(), **self._model_extra()}, path)
        return path

    def save_grid(self, name: str) -> Path:
        cfg = self.cfg
        n = cfg.grid_size * cfg.grid_size
        images = self._to_pixels(sample_images(self._sampling_model(), n, self.image_shape,
                                               labels=grid_labels(cfg, self.num_classes), sampler=cfg.sampler,
                                               num_steps=cfg.sample_steps, guidance=cfg.guidance, seed=cfg.seed,
                                               device=self.device))
        path = self.out / name
        save_grid(images, path, nrow=cfg.grid_size, row_labels=grid_row_labels(cfg, self.num_classes))
        return path

    def _provenance(self) -> dict:
        """What model.pt says about the data behind it: --init-from refuses a model that saw private data."""
        public = [p for p in self.phases if p.public]
        return {"public_only": all(p.public for p in self.phases),
                "public_data": self._describe_public() if public else None,
                "public_paths": sorted(set(self.public_paths)) if public else [],
                "phases": [p.to_dict() for p in self.phases], "init": self.init_source}

    def _describe_public(self) -> str:
        from .public import describe

        return describe(self.cfg.public_data)

    def _count_selected(self, spec: str) -> int:
        from .finetune import select_trainable

        names = set(select_trainable(self.denoiser, spec, apply=False))
        return sum(p.numel() for n, p in self.denoiser.named_parameters() if n in names)

    def _extra_phases(self) -> list[dict]:
        """Rows for the report's phases that are not training phases of the denoiser (dp-ldm's autoencoder)."""
        return []

    def _phase_report(self) -> list[dict]:
        out = list(self._extra_phases())
        for phase, start in zip(self.phases, phase_starts(self.phases)):
            done = max(0, min(self.step - start, phase.steps))
            row = {**phase.to_dict(), "steps_done": done,
                   "data_description": self._describe_public() if phase.public else (
                       self.dataset.name if self.dataset is not None else None)}
            if phase.private:
                row.update(noise_multiplier=self.noise_multiplier, sample_rate=self.q,  # 0 until it starts
                           epsilon=0.0 if self.engine is None else self.engine.get_epsilon(self.cfg.delta))
            else:
                row.update(epsilon=0.0, note="public data only: no privacy cost" if phase.public
                           else "private data WITHOUT differential privacy")
            out.append(row)
        return out

    def breaks_dp(self) -> bool:
        """Whether something outside the engine makes the run not DP whatever it spends (a recipe's
        non-private part): the progress bar then shows no epsilon as if it held."""
        return False

    def privacy_report(self) -> dict:
        cfg = self.cfg
        private_steps = 0 if self.private_phase is None else min(
            self.private_phase.steps, max(0, self.step - phase_starts(self.phases)[self.phases.index(self.private_phase)]))
        if self.dataset is None:  # a pretrain run
            return {"private": False, "epsilon": None, "public_only": True, "private_data_used": False,
                    "note": "pre-trained on public data only: no private data was read",
                    "public_data": self._describe_public(), "steps": self.step, "planned_steps": self.total_steps,
                    "complete": self.step >= self.total_steps, "phases": self._phase_report()}
        common = {"steps": private_steps if self.private_phase is not None else self.step,
                  "planned_steps": (self.private_phase or self.phases[-1]).steps, "sample_rate": self.q,
                  "expected_batch_size": getattr(getattr(self, "optimizer", None), "expected_batch_size", None)
                  or float(cfg.batch_size), "dataset_size": len(self.dataset),
                  "epochs": private_steps * self.q, "multiplicity": cfg.multiplicity,
                  "complete": self.step >= self.total_steps, "total_steps": self.step,
                  "phases": self._phase_report(), "init": self.init_source,
                  "public_data": self._describe_public() if any(p.public for p in self.phases)
                  else (self.init_source or {}).get("public_data"), "trainable": cfg.trainable,
                  "trainable_parameters": self._count_selected(cfg.trainable),
                  # a pinned seed keys the noise and the batches: the epsilon holds only while it stays secret
                  "noise_seed_pinned": cfg.noise_seed is not None}
        if self.private_phase is None:
            return {"private": False, "epsilon": None, "note": "trained without differential privacy",
                    **common}
        if self.engine is None:  # still in a public phase: nothing private released yet
            return {"private": True, "epsilon": 0.0, "delta": cfg.delta, "guarantee_lost": None,
                    "releases_charged": 0, "adjacency": "add/remove-one (Poisson sampling)",
                    "noise_multiplier": self.noise_multiplier, "max_grad_norm": cfg.max_grad_norm,
                    "target_epsilon": cfg.target_epsilon if cfg.noise_multiplier is None else None,
                    "accountant": cfg.accountant, **common}
        rep = self.engine.accountant.report(cfg.delta).to_dict()
        lost = self.engine.why_no_privacy if self.engine._no_privacy else None
        return {"private": True, "epsilon": math.inf if lost else rep["epsilon"], "delta": cfg.delta,
                "guarantee_lost": lost,
                "releases_charged": self.engine.accountant.steps - self.engine.prior_steps,
                "adjacency": f"{rep['adjacency']} (Poisson sampling)",
                "noise_multiplier": self.noise_multiplier, "max_grad_norm": cfg.max_grad_norm,
                "target_epsilon": cfg.target_epsilon if cfg.noise_multiplier is None else None,
                "accountant": rep["accountant"], "epsilon_lower": rep["epsilon_lower"],
                "epsilon_estimate": rep["epsilon_estimate"], "history": rep["history"],
                "accountant_note": rep["note"], **common}

    def write_report(self) -> dict:
        report = self.privacy_report()
        if not self.is_main:
            return report
        atomic_write_json(report, self.out / "privacy_report.json")
        return report

    # -- training
    def _record_generators(self, idx):
        """One generator per sample of a private chunk, keyed by (the engine's secret record seed, the
        loader's logical step, the sample's index in the private data): see dpfast.random.record_generators.
        None outside private steps (public and non-private phases draw from ``self.gen``)."""
        if not self.phase.private:
            return None
        if idx is None:  # a private chunk without its indices would fall back to one stream in batch order
            from dpfast.errors import DPError

            raise DPError("internal: a private chunk's loss was computed without its samples' indices, so its "
                          "randomness cannot be keyed per record; the step is refused")
        from dpfast.random import record_generators

        return record_generators(idx, seed=self.engine.record_seed, step=self.loader.chunk_step, device=self.device)

    def _chunk_loss(self, x: torch.Tensor, y: torch.Tensor, idx=None) -> tuple[torch.Tensor, int]:
        """Forward/backward of one physical chunk; returns (sum of row losses, rows). ``idx``: the
        chunk's indices in the private data (private steps)."""
        cfg = self.cfg
        if len(x) == 0:  # an empty Poisson batch: nothing to compute; optimizer.step() still runs
            return torch.zeros((), device=self.device), 0
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True) if self.num_classes else None
        private = self.phase.private
        model = self.model if private else self.denoiser
        rows = edm_loss_rows(model, x, y, multiplicity=cfg.multiplicity, p_mean=cfg.p_mean,
                             p_std=cfg.p_std, label_dropout=cfg.label_dropout, augment=self.augment,
                             generator=self.gen, num_classes=self.num_classes,
                             sigma_data=cfg.sigma_data, sigma_range=self.phase.sigma_range,
                             sigma_bias=self.phase.sigma_bias, generators=self._record_generators(idx))
        if private:
            rows.mean().backward()  # the engine undoes the mean to get per-sample gradients
        else:  # the same estimator as DP-SGD without clipping and noise: sum / (K * B_expected)
            (rows.sum() / (cfg.multiplicity * self._phase_q * len(self._phase_data))).backward()
        return rows.detach().sum(), rows.numel()

    def _private_steps(self):
        """Yields (loss sum, rows) after each logical step."""
        while True:
            loss, rows = 0.0, 0
            for x, y in self.loader:
                self.optimizer.zero_grad()
                l, r = self._chunk_loss(x, y, self.loader.chunk_indices)
                loss, rows = loss + l, rows + r
                if self.optimizer.step():
                    yield loss, rows
                    loss, rows = 0.0, 0

    def _nonprivate_steps(self):
        """Poisson batches of the phase's data (public, or private without DP) from the same
        counter-based sampler the engine uses, without DP."""
        from dpfast.random import poisson_mask

        cfg = self.cfg
        data, q = self._phase_data, self._phase_q
        seed = self.cfg.seed + 2 + (1 if self.phase.public else 0)
        while True:
            idx = poisson_mask(len(data), q, seed=seed, step=self.step).nonzero().flatten()
            self.optimizer.zero_grad()
            loss, rows = 0.0, 0
            size = cfg.max_physical_batch_size
            for start in range(0, len(idx), size):
                items = [data[int(i)] for i in idx[start:start + size]]
                x = torch.stack([it[0] for it in items])
                y = torch.stack([it[1] for it in items])
                l, r = self._chunk_loss(x, y)
                loss, rows = loss + l, rows + r
            self.optimizer.step()
            yield loss, rows

    def _stop_step(self) -> int:
        max_steps = self.cfg.max_steps
        return self.total_steps if max_steps is None else min(self.total_steps, max_steps)

    def _already_finished(self) -> dict | None:
        """A finished run whose final outputs were all written: rerunning it changes nothing."""
        report_path, model_path = self.out / "privacy_report.json", self.out / "model.pt"
        if self.resume_state is None or self.step < self.total_steps or not (report_path.exists() and model_path.exists()):
            return None
        if min(report_path.stat().st_mtime, model_path.stat().st_mtime) < self.ckpt_path.stat().st_mtime:
            return None  # killed while writing its final outputs: write them again
        try:
            report = json.loads(report_path.read_text())
        except ValueError:
            return None
        fresh = self.privacy_report()  # the ledger may have charged releases the saved report never saw
        if any(report.get(k) != fresh.get(k) for k in ("steps", "releases_charged", "guarantee_lost", "private")):
            return None
        eps = report.get("epsilon")
        lost = report.get("guarantee_lost")
        self.log(f"already finished ({self.step} steps): nothing to do. "
                 + (f"this run is NOT differentially private (epsilon infinite): {lost}" if lost else
                    f"epsilon spent: {eps:.4g} at delta={report['delta']:g}" if eps is not None else "not private")
                 + f"; privacy report: {report_path}")
        return {"status": "finished", "reason": "done", "steps": self.step, "report": report,
                "train_seconds": self.elapsed}

    def train(self) -> dict:
        try:
            done = self._already_finished()
            return done if done is not None else self._train()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _train(self) -> dict:
        cfg = self.cfg
        stop_at = self._stop_step()
        self.log(self.describe())
        if self.resume_state is not None:
            self.log(f"resuming from step {self.step} of {self.total_steps} ({self.ckpt_path})")
        atomic_write_json(public_config(cfg), self.out / "config.json")
        if self.engine is not None and self.resume_state is None:
            # before the first release: a run killed before its first periodic checkpoint then
            # resumes from step 0 (the ledger charges what it released) instead of refusing to start
            self.save_checkpoint()
        ends = [start + p.steps for start, p in zip(phase_starts(self.phases), self.phases)]
        start = self.started
        last_ckpt = last_eps_time = time.monotonic()
        eps = self.engine.get_epsilon(cfg.delta) if self.engine is not None else (
            0.0 if self.private_phase is not None else math.inf)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=stop_at, initial=self.step, unit="step", dynamic_ncols=True,
                       mininterval=1.0, file=sys.stderr)
        reason = "done"
        first_step, train_seconds = self.step, 0.0
        smooth = None
        step_started = time.monotonic()
        step_time = 0.0
        steps = self._private_steps() if self.phase.private else self._nonprivate_steps()
        stop_signal = _StopOnSignal()
        try:
            while self.step < stop_at:
                over_budget = (cfg.time_budget is not None
                               and time.monotonic() - start + step_time > cfg.time_budget)
                if self._agree(over_budget or stop_signal.received is not None):
                    reason = f"{stop_signal.received}" if stop_signal.received else "time budget"
                    break
                if self.step >= ends[self.phase_index]:  # the next phase begins
                    steps.close()
                    self._enter_phase(self.phase_index + 1, fresh=True)
                    self.log(f"phase {self.phase_index + 1}/{len(self.phases)}: {self.phase.name} "
                             f"({self.phase.data}, {self.phase.steps} steps, trainable {self.phase.trainable}"
                             f"{', DP-SGD' if self.phase.private else ''})")
                    steps = self._private_steps() if self.phase.private else self._nonprivate_steps()
                    if self.phase.private:  # before its first release (see above)
                        self.save_checkpoint()
                    step_started = time.monotonic()
                loss, rows = next(steps)
                self.ema.update(self.denoiser)
                self.step += 1
                now = time.monotonic()
                step_time = now - step_started
                self.elapsed += step_time
                train_seconds += step_time
                step_started = now
                # The training loss is shown for public and non-private phases only. A private batch's
                # loss is a function of the data without noise, and a progress bar on stderr ends up in
                # logs (nohup, SLURM, CI): printing it would release it outside the guarantee.
                if rows and not self.phase.private:
                    value = float(loss) / rows
                    smooth = value if smooth is None else 0.9 * smooth + 0.1 * value
                if self.engine is not None and now - last_eps_time >= cfg.epsilon_every_seconds:
                    eps, last_eps_time = self.engine.get_epsilon(cfg.delta), now
                if bar is not None:
                    bar.update(1)
                    shown = "private" if self.phase.private else (f"{smooth:.4f}" if smooth is not None else "-")
                    bar.set_postfix(loss=shown, eps="not DP" if self.breaks_dp() else f"{eps:.3g}", refresh=False)
                if cfg.grid_every and self.step % cfg.grid_every == 0 and self.step < stop_at and self.is_main:
                    self.save_grid(f"samples/step_{self.step:07d}.png")
                if (self.step % cfg.checkpoint_every == 0 or now - last_ckpt >= cfg.checkpoint_seconds):
                    self.save_checkpoint()
                    self.write_report()
                    last_ckpt = time.monotonic()
                    step_started = last_ckpt  # do not count writing as training time
        finally:
            stop_signal.restore()
            if bar is not None:
                bar.close()
            steps.close()
        if self.step >= stop_at and self.step < self.total_steps:
            reason = "max steps"
        done_now = self.step - first_step
        rate = f" ({done_now / train_seconds:.3g} steps/s)" if train_seconds > 0 else ""
        self.log(f"trained {done_now} steps in {train_seconds:.1f} s{rate}, "
                 f"{time.monotonic() - start:.1f} s since start")
        return self._finish(reason)

    def _finish(self, reason: str) -> dict:
        self.save_checkpoint()
        if not self.is_main:  # rank 0 writes the model, samples and report
            self._barrier()
            return {"status": "done", "reason": reason, "steps": self.step, "report": None,
                    "train_seconds": self.elapsed}
        model_path = self.save_model()
        grid_path = self.save_grid("samples.png")
        report = self.write_report()
        done = self.step >= self.total_steps
        if self.dataset is None:
            eps_line = f"pre-trained on public data only ({self._describe_public()}): no private data read"
        elif report.get("guarantee_lost"):
            eps_line = f"this run is NOT differentially private (epsilon infinite): {report['guarantee_lost']}"
        elif self.private_phase is not None and self.engine is None:
            eps_line = "epsilon spent: 0 (the private phase has not started)"
        elif self.engine is not None:
            eps_line = (f"epsilon spent: {report['epsilon']:.4g} at delta={self.cfg.delta:g} "
                        f"({report['accountant']} accountant, {report['adjacency']}; sigma="
                        f"{self.noise_multiplier:.4g}, q={self.q:.4g}, {report['steps']} steps"
                        + (f", {report['releases_charged']} releases charged: a resume re-ran steps the ledger "
                           "had already released" if report["releases_charged"] != report["steps"] else "") + ")")
        else:
            eps_line = "no privacy: trained without DP (--no-private)"
        status = "finished" if done else f"stopped ({reason}) at step {self.step}/{self.total_steps}; " \
                                         f"run the same command again to resume"
        self.log(f"{status}. {eps_line}")
        self.log(f"samples: {grid_path}  model: {model_path}  privacy report: {self.out / 'privacy_report.json'}")
        self._barrier()
        return {"status": status, "reason": reason, "steps": self.step, "report": report,
                "train_seconds": self.elapsed}

    def describe(self) -> str:
        cfg = self.cfg
        total = sum(p.numel() for p in self.denoiser.parameters())
        phases = "; ".join(f"{p.name}: {p.steps} steps on {'the private data' if not p.public else p.data}, "
                           f"trainable {p.trainable}" + (" (DP-SGD)" if p.private else "") for p in self.phases)
        init = f"; initialised from {cfg.init_from}" if cfg.init_from else ""
        trained = count_parameters(self.denoiser)
        if self.dataset is None:
            return (f"DDPM++ U-Net, {total:,} parameters; pre-training on {self._describe_public()} "
                    f"{self.image_shape}, {self.num_classes} classes; {phases}; device {self.device}")
        n = len(self.dataset)
        head = (f"DDPM++ U-Net, {total:,} parameters ({trained:,} trainable now){init}; {n} training images "
                f"{self.dataset.image_shape}, {self.num_classes} classes; expected batch {cfg.batch_size} "
                f"(q={self.q:.4g}) x multiplicity {cfg.multiplicity}; phases: {phases}; device "
                f"{self.device}")
        if self.private_phase is None:
            return head + "; NOT private"
        target = (f"target epsilon {cfg.target_epsilon:g}" if cfg.noise_multiplier is None
                  else "noise multiplier given")
        return head + (f"; DP-SGD: sigma={self.noise_multiplier:.4g} ({target}, delta={cfg.delta:g}), "
                       f"C={cfg.max_grad_norm:g}, {cfg.accountant} accountant")


def trainer_class(cfg: TrainConfig):
    """The trainer of cfg.recipe (dpfast.recipes.TRAINERS)."""
    import importlib

    from dpfast.recipes import TRAINERS

    if cfg.recipe not in TRAINERS:
        raise ConfigError(f"unknown recipe {cfg.recipe!r}; choose one of {sorted(TRAINERS)}")
    module, name = TRAINERS[cfg.recipe].split(":")
    return getattr(importlib.import_module(module), name)


def train(cfg: TrainConfig, out_dir, **kwargs) -> dict:
    cfg.validate()
    return trainer_class(cfg)(cfg, out_dir, **kwargs).train()


def _model_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():  # the newer of model.pt (end of an invocation) and checkpoint.pt
        found = [p for p in (path / "model.pt", path / "checkpoint.pt") if p.exists()]
        path = max(found, key=lambda p: p.stat().st_mtime) if found else path / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}: give a run directory of `dpfast train`, or its "
                                "model.pt / checkpoint.pt")
    return path


def draw_batches(draw, num: int, labels: torch.Tensor | None, seed: int, batch_size: int = 500,
                 progress: bool = False, **options) -> torch.Tensor:
    """`num` images from a `load_sampler` draw function, in batches with one seed each (the same
    images however the caller splits the work), with a progress bar; (num, C, H, W) in [-1, 1]."""
    from tqdm import tqdm

    out = []
    with tqdm(total=num, desc="sampling", unit="image", disable=not progress, dynamic_ncols=True,
              leave=False) as bar:
        for i in range(0, num, batch_size):
            m = min(batch_size, num - i)
            out.append(draw(m, None if labels is None else labels[i:i + m], seed=seed * 1_000_003 + i,
                            batch_size=batch_size, **options))
            bar.update(m)
    return torch.cat(out)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8, as `dpfast sample` writes them."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def load_sampler(path: str | os.PathLike, device="cpu"):
    """What `dpfast sample` needs from any recipe's run: (draw, meta) where
    draw(num, labels, seed, **options) returns (num, C, H, W) images in [-1, 1] and meta has
    "config", "image_shape", "num_classes", "step", "kind" ("diffusion" or "dp-mepf-generator").
    Diffusion options: sampler, num_steps, guidance, batch_size, and the sampler's own (S_churn, ...)."""
    file = _model_file(path)
    state = torch.load(file, map_location="cpu", weights_only=True)  # data only: a file cannot run code
    if state.get("kind") == "dp-mepf-generator":
        from dpfast.recipes.dp_mepf import load_generator

        gen = load_generator(state, device)
        meta = {"config": TrainConfig.from_dict(state["config"]), "image_shape": tuple(state["image_shape"]),
                "num_classes": state["num_classes"], "step": state["step"], "kind": state["kind"]}

        def draw(num, labels=None, seed=0, batch_size=500, **ignored):
            return gen.sample(num, labels, seed=seed, batch_size=batch_size, device=device)
        return draw, meta
    denoiser, meta = load_denoiser(file, device)
    decode = lambda x: x  # noqa: E731
    if meta["config"].recipe == "dp-ldm":  # decode the latents with the run's autoencoder
        from dpfast.recipes.dp_ldm import load_autoencoder

        if "autoencoder" in state:       # model.pt
            ae_state, pixel_shape = state["autoencoder"], state["pixel_shape"]
        else:                            # checkpoint.pt of a running or stopped run: its autoencoder.pt
            ae_file = file.parent / "autoencoder.pt"
            if not ae_file.exists():
                raise ValueError(f"{file} is a dp-ldm checkpoint without its {ae_file.name}: cannot decode its samples")
            ae_state = torch.load(ae_file, map_location="cpu", weights_only=True)
            pixel_shape = ae_state["key"]["pixel_shape"]
        ae = load_autoencoder(ae_state, device)
        decode, meta["latent_shape"], meta["image_shape"] = ae.decode, meta["image_shape"], tuple(pixel_shape)
        state = dict(state, kind="latent-diffusion")
    meta["kind"] = state.get("kind", "diffusion")
    cfg = meta["config"]
    latent_shape = meta.get("latent_shape", meta["image_shape"])

    def draw(num, labels=None, seed=0, sampler=None, num_steps=None, guidance=None, batch_size=500, **extra):
        x = sample_images(denoiser, num, latent_shape, labels=labels, sampler=sampler or cfg.sampler,
                          num_steps=num_steps or cfg.sample_steps,
                          guidance=cfg.guidance if guidance is None else guidance, batch_size=batch_size,
                          seed=seed, device=device, **extra)
        with torch.no_grad():
            return decode(x).clamp(-1, 1)
    return draw, meta


def load_denoiser(path: str | os.PathLike, device="cpu") -> tuple[EDMPrecond, dict]:
    """The EMA denoiser of a run: `path` is a run directory, its model.pt, or its checkpoint.pt.
    Returns (denoiser in eval mode, {"config", "image_shape", "num_classes", "step"}); a run with
    stage experts gives a `StageExperts` denoiser and meta["experts"]."""
    state = torch.load(_model_file(path), map_location="cpu", weights_only=True)
    if state.get("kind") == "dp-mepf-generator":
        raise ValueError(f"{path} is a DP-MEPF generator, not a diffusion model: use load_sampler")
    cfg = TrainConfig.from_dict(state["config"])
    image_shape = tuple(state["image_shape"])
    if "shadow" not in state["ema"]:                          # model.pt: EMA weights and buffers
        weights = state["ema"]
    else:                                                     # checkpoint.pt: EMA over the buffers
        weights = dict(state["model"], **state["ema"]["shadow"])
    emb = weights.get("net.label_embed.weight")
    num_classes = 0 if emb is None else emb.shape[0] - 1
    denoiser = build_denoiser(cfg, image_shape, num_classes)
    denoiser.load_state_dict(weights)
    meta = {"config": cfg, "image_shape": image_shape, "num_classes": num_classes,
            "step": state["step"]}
    if state.get("experts"):  # dp-syngen: the sampler switches to a stage's expert inside its range
        from .syngen import StageExperts

        experts = []
        for e in state["experts"]:
            model = build_denoiser(cfg, image_shape, num_classes)
            model.load_state_dict(e["ema"])
            experts.append((*e["sigma_range"], model, e["unconditional"]))
        denoiser = StageExperts(denoiser, experts)
        meta["experts"] = [{k: v for k, v in e.items() if k != "ema"} for e in state["experts"]]
    return denoiser.to(device).eval(), meta

