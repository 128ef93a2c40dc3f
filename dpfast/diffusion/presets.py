"""Training configurations: one dataclass, DPDM's recipe as its defaults, and named presets.

DPDM on (Fashion-)MNIST (Dockhorn et al., configs/fmnist_28/train_eps_*.yaml): DDPM++ with nf=32,
ch_mult (1, 2, 2), 2 res blocks, attention at 7x7, dropout 0; EDM preconditioning and loss with
ln sigma ~ N(-1.2, 1.2^2); noise multiplicity K=32; label dropout 0.1 for classifier-free guidance;
Adam lr 3e-4, no weight decay; EMA 0.999; C=1; expected batch 4096; 300 epochs; delta=1e-5; sigma
calibrated for the target epsilon; DDIM sampling with 50 steps and no guidance.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields


class ConfigError(ValueError):
    """A setting that cannot run (or cannot run privately): reported as a one-line error, before
    any privacy is spent."""


RECIPES = ("dpdm", "dp-diffusion", "dp-lora", "dp-ldm", "dp-mepf", "dp-syngen", "dp-sad", "pretrain")
SAD_TEACHERS = ("dp", "nonprivate")


@dataclass
class TrainConfig:
    recipe: str = "dpdm"                   # dpdm (DP-SGD diffusion, this file's defaults) | dp-diffusion |
                                           # dp-lora | dp-ldm | dp-mepf | dp-syngen | dp-sad | pretrain (public only)
    # data
    data_dir: str | None = None            # None: Fashion-MNIST from Debian's dataset-fashion-mnist
    subset: int | None = None              # train on the first N images only (DP protects those N)
    resolution: int | None = None          # average-pool images down to this size (integer factor)
    num_classes: int | None = None         # the public number of classes; None: the data's declared one
                                           # (Fashion-MNIST 10, an image folder's sub-folders). IDX files
                                           # other than Fashion-MNIST need it in private runs
    # model (DDPM++)
    nf: int = 32
    ch_mult: tuple = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (7,)
    dropout: float = 0.0
    embedding_type: str = "positional"
    class_conditional: bool = True
    # diffusion loss (EDM with DPDM's sigma sampling)
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = math.sqrt(1.0 / 3.0)
    label_dropout: float = 0.1
    multiplicity: int = 32                 # K rows per sample, each with its own noise (and augmentation)
    augment: str = "none"                  # none | flip | crop | flip+crop, per row
    crop_padding: int = 2
    # optimisation
    batch_size: int = 4096                 # expected logical batch (Poisson sampling, q = batch_size / N)
    epochs: float = 300.0                  # steps = ceil(epochs / q): expected passes over the data
    steps: int | None = None               # overrides epochs when set
    lr: float = 3e-4
    ema_decay: float = 0.999
    max_physical_batch_size: int = 64      # samples per forward/backward chunk: 64 x K=32 = 2048 rows,
                                           # ~25 GB of saved activations for DPDM's U-Net in fp32
    # privacy
    private: bool = True
    target_epsilon: float | None = 10.0
    delta: float = 1e-5
    noise_multiplier: float | None = None  # None: calibrated by the accountant for target_epsilon
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    mode: str = "bk"                       # engine mode: bk | two-pass
    backend: str = "auto"                  # engine backend: torch | triton | auto
    # randomness
    seed: int = 0                          # model init, diffusion noise, sample grids (public)
    noise_seed: int | None = None          # engine seed (Poisson sampling + DP noise): None = from the
                                           # OS; pin it only for tests, a known seed voids the privacy
    # sampling (grids during training; `dpfast sample` has its own options)
    sampler: str = "ddim"
    sample_steps: int = 50
    guidance: float = 0.0
    grid_every: int = 500                  # logical steps between sample grids (0: only at the end)
    grid_size: int = 10                    # grid_size x grid_size images; one row per class
    # run control (may change when a run is resumed)
    device: str = "auto"
    threads: int | None = None             # intra-op CPU threads; None or 0: PyTorch's default
    checkpoint_every: int = 100            # logical steps between checkpoints
    checkpoint_seconds: float = 300.0      # ... and at most this many seconds between checkpoints
    max_steps: int | None = None           # stop at this logical step (total across resumes)
    time_budget: float | None = None       # seconds for this invocation (setup included), then
                                           # checkpoint, write samples + report, and exit
    epsilon_every_seconds: float = 30.0    # how often the progress bar recomputes epsilon
    adopt_copied_run: bool = False         # resume a run directory that was copied (its ledger is a copy):
                                           # only if the original will never continue (dpfast.ledger)
    deterministic_resume: bool = False     # a resume keeps the checkpoint's noise key (bit-exact resumes, for
                                           # tests): sound only if no checkpoint is continued twice; by
                                           # default every resume draws a fresh key (PrivacyEngine)
    # public data and DP-MEPF (dpfast.recipes.dp_mepf; nf is its generator's width, batch_size its
    # generated batch per step, steps its generator steps)
    public_data: str = "digits"            # a dpfast.diffusion.public source name, or a path
    mepf_moments: str = "mean+second"      # mean | mean+second: the feature moments released and matched
    mepf_feature_steps: int = 1500         # training steps of the feature network on the public data
    # phases and fine-tuning (dpfast.diffusion.phases, dpfast.diffusion.finetune)
    init_from: str | None = None           # a pre-trained model to fine-tune: builtin:NAME, a run dir or model.pt
    trainable: str = "all"                 # all | attention | lora:R | lora:R+conv | re:REGEX (private phase)
    pretrain_steps: int = 0                # a public phase on public_data before the private one (0: none)
    sigma_range: str | None = None         # "LO,HI": the private phase trains on these noise levels only
    sigma_bias: str | None = None          # "LO,HI,W": draw sigma from [LO, HI] with probability W
                                           # (DP-Diffusion's biased noise-level sampling), else as usual
    channels: int = 1                      # image channels of a pretrain run (other runs: the data's)
    folder_channels: int | None = None     # an image folder's images are converted to this many channels
                                           # (1 or 3; none: 3, RGB); never read off the images
    ldm_latent_channels: int = 3           # dp-ldm: latent channels (the autoencoder halves each side)
    ldm_autoencoder_steps: int = 1500      # dp-ldm: autoencoder training steps on the public data
    # DP-SynGen (dpfast.diffusion.syngen; recipe dp-syngen): the public phase is pretrain_steps on
    # public_data (generated images), at the stage's noise levels
    syngen: str | None = None              # coarse | cleaning | finetune
    tau: float | None = None               # the stage threshold (a sigma); None: the elbow rule
    stage_experts: bool = True             # coarse/cleaning: the public phase's model serves its stage
    # DP-SAD (dpfast.recipes.dp_sad; recipe dp-sad): a teacher trained first (in out/teacher), then the
    # student (nf, ch_mult, ... above) distilled from it at one random noise level per row, against a
    # discriminator; steps / epochs are the student's
    sad_teacher: str = "dp"                # dp: DP-SGD teacher, composed into epsilon | nonprivate: the
                                           # paper's setting, epsilon does NOT cover the teacher
    sad_teacher_steps: int = 0             # the teacher's DP-SGD steps (recipe dp-sad needs >= 1)
    sad_teacher_nf: int = 32               # the teacher U-Net's width (its other sizes are the student's)
    sad_adv_weight: float = 0.1            # weight of the adversarial term in the student's loss (0: none,
                                           # no discriminator: the paper's ablation)
    sad_disc_weight: float = 1.0           # weight of the discriminator's loss in the shared release
    sad_disc_nf: int = 16                  # the discriminator's width

    def validate(self) -> "TrainConfig":
        """Every field checked before any data is read or any privacy is spent; one-line errors."""
        from .augment import AUGMENT_CHOICES

        def check(ok, msg):
            if not ok:
                raise ConfigError(msg)

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def finite(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for name in ("private", "class_conditional"):
            check(isinstance(getattr(self, name), bool), f"{name} must be true or false; got {getattr(self, name)!r}")
        choices = {"recipe": RECIPES, "sampler": ("ddim", "edm"), "mode": ("bk", "two-pass"),
                   "backend": ("torch", "triton", "auto"), "accountant": ("prv", "rdp"),
                   "augment": AUGMENT_CHOICES, "embedding_type": ("positional", "fourier"),
                   "mepf_moments": ("mean", "mean+second"), "sad_teacher": SAD_TEACHERS}
        for name, allowed in choices.items():
            value = getattr(self, name)
            check(value in allowed, f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}; got {value!r}")
        for name in ("nf", "num_res_blocks", "multiplicity", "batch_size", "max_physical_batch_size",
                     "sample_steps", "grid_size", "checkpoint_every", "mepf_feature_steps", "channels",
                     "ldm_latent_channels", "ldm_autoencoder_steps", "sad_teacher_nf", "sad_disc_nf"):
            value = getattr(self, name)
            check(is_int(value) and value >= 1, f"--{name.replace('_', '-')} must be an integer >= 1; got {value!r}")
        for name in ("crop_padding", "grid_every", "seed", "pretrain_steps", "sad_teacher_steps"):
            value = getattr(self, name)
            check(is_int(value) and value >= 0, f"--{name.replace('_', '-')} must be an integer >= 0; got {value!r}")
        for name in ("steps", "max_steps", "subset", "resolution", "num_classes"):
            value = getattr(self, name)
            check(value is None or (is_int(value) and value >= (0 if name == "max_steps" else 1)),
                  f"--{name.replace('_', '-')} must be a positive integer or none; got {value!r}")
        for name in ("lr", "max_grad_norm", "epochs", "sigma_data", "checkpoint_seconds"):
            value = getattr(self, name)
            check(finite(value) and value > 0, f"--{name.replace('_', '-')} must be > 0; got {value!r}")
        for name in ("target_epsilon", "noise_multiplier", "time_budget"):
            value = getattr(self, name)
            check(value is None or finite(value) and (value >= 0 if name == "time_budget" else value > 0),
                  f"--{name.replace('_', '-')} must be > 0 (or none); got {value!r}")
        check(0 < self.delta < 1, f"--delta must be in (0, 1); got {self.delta!r}")
        check(0 <= self.ema_decay < 1, f"--ema-decay must be in [0, 1); got {self.ema_decay!r}")
        check(0 <= self.label_dropout < 1, f"--label-dropout must be in [0, 1); got {self.label_dropout!r}")
        check(0 <= self.dropout < 1, f"--dropout must be in [0, 1); got {self.dropout!r}")
        check(self.folder_channels in (None, 1, 3), f"--folder-channels must be 1, 3 or none; got {self.folder_channels!r}")
        check(finite(self.p_mean), f"--p-mean must be finite; got {self.p_mean!r}")
        check(finite(self.p_std) and self.p_std > 0, f"--p-std must be > 0; got {self.p_std!r}")
        check(finite(self.guidance) and self.guidance >= 0, f"--guidance must be >= 0; got {self.guidance!r}")
        check(finite(self.epsilon_every_seconds) and self.epsilon_every_seconds >= 0,
              f"--epsilon-every-seconds must be >= 0; got {self.epsilon_every_seconds!r}")
        check(self.threads is None or is_int(self.threads) and self.threads >= 0,
              f"--threads must be an integer >= 0; got {self.threads!r}")
        check(self.noise_seed is None or is_int(self.noise_seed) and self.noise_seed >= 0,
              f"--noise-seed must be an integer >= 0 or none; got {self.noise_seed!r}")
        check(all(is_int(v) and v >= 1 for v in self.ch_mult) and len(self.ch_mult) >= 1,
              f"--ch-mult must be positive integers; got {self.ch_mult!r}")
        from .finetune import parse_trainable

        check(isinstance(self.trainable, str), f"--trainable must be text; got {self.trainable!r}")
        parse_trainable(self.trainable)
        self.sigma_range_values()
        self.sigma_bias_values()
        check(self.init_from is None or isinstance(self.init_from, str) and self.init_from,
              f"--init-from must be a path or builtin:NAME; got {self.init_from!r}")
        if self.recipe == "pretrain":
            check(self.resolution is not None, "a pretrain run needs --resolution (the image side it trains at)")
            check(self.steps is not None, "a pretrain run needs --steps")
        if self.recipe == "dp-mepf":
            check(self.init_from is None and self.trainable == "all" and self.pretrain_steps == 0
                  and self.sigma_range is None and self.sigma_bias is None,
                  "recipe dp-mepf trains no diffusion model: --init-from, --trainable, --pretrain-steps and "
                  "--sigma-* do not apply")
        if self.recipe == "pretrain":
            check(self.init_from is None, "a pretrain run starts from scratch: drop --init-from")
        check(isinstance(self.public_data, str) and self.public_data.strip(),
              f"--public-data must name a public source or a path; got {self.public_data!r}")
        # "private" names the private data set in a phase: as public data it would be a non-DP phase on it
        check(self.public_data.strip() not in ("private", "./private") and "private" not in self.public_data.split("+"),
              "--public-data private: the private data set is never public data (a folder called 'private' "
              "can be given by its absolute path)")
        from .public import check_source_names

        try:
            check_source_names(self.public_data)
        except ValueError as e:
            raise ConfigError(f"--public-data: {e}") from None
        check(isinstance(self.stage_experts, bool), f"--stage-experts must be true or false; got {self.stage_experts!r}")
        check(self.tau is None or finite(self.tau) and 0.002 < self.tau < 80,
              f"--tau must be a noise level inside the sampler's schedule (0.002, 80), or none; got {self.tau!r}")
        if self.recipe == "dp-syngen":
            from .syngen import VARIANTS

            check(self.syngen in VARIANTS, f"recipe dp-syngen needs --syngen {'|'.join(VARIANTS)}; got {self.syngen!r}")
            check(self.pretrain_steps >= 1, "recipe dp-syngen needs --pretrain-steps >= 1 (its public phase on "
                                            "generated images)")
            check(self.syngen == "finetune" or self.sigma_range is None,
                  f"--syngen {self.syngen} sets the private phase's noise levels from --tau: drop --sigma-range")
            check(self.syngen != "finetune" or self.tau is None,
                  "--syngen finetune trains every noise level in both phases: --tau does not apply")
        else:
            check(self.syngen is None and self.tau is None,
                  f"--syngen and --tau belong to recipe dp-syngen (this run's recipe is {self.recipe})")
        for name in ("sad_adv_weight", "sad_disc_weight"):
            value = getattr(self, name)
            check(finite(value) and value >= 0, f"--{name.replace('_', '-')} must be >= 0; got {value!r}")
        if self.recipe == "dp-sad":
            check(self.sad_teacher_steps >= 1, "recipe dp-sad needs --sad-teacher-steps >= 1 (its teacher's training)")
            check(self.init_from is None and self.pretrain_steps == 0 and self.trainable == "all"
                  and self.sigma_range is None and self.sigma_bias is None,
                  "recipe dp-sad trains its student from scratch on every noise level: --init-from, --pretrain-steps, "
                  "--trainable and --sigma-* do not apply")
            check(self.sad_adv_weight == 0 or self.sad_disc_weight > 0,
                  "--sad-adv-weight > 0 needs a discriminator that learns: --sad-disc-weight > 0")
            # the pair's second output (the discriminator's loss) depends on its first: two-pass cannot
            # replay that, and would refuse the first step after the teacher spent its budget
            check(self.sad_adv_weight == 0 or self.mode == "bk",
                  "recipe dp-sad with a discriminator needs --mode bk (two-pass cannot replay its loss)")
        else:
            sad = [f.name for f in fields(self) if f.name.startswith("sad_")
                   and getattr(self, f.name) != getattr(TrainConfig, f.name)]
            check(not sad, f"--{sad[0].replace('_', '-') if sad else ''} belongs to recipe dp-sad (this run's recipe "
                           f"is {self.recipe})")
        if self.private:
            check(self.target_epsilon is not None or self.noise_multiplier is not None,
                  "a private run needs --target-epsilon or --noise-multiplier")
        if self.device not in ("auto", "cpu"):
            import torch

            try:
                dev = torch.device(self.device)
            except RuntimeError:
                raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N; got {self.device!r}") from None
            check(dev.type != "cuda" or torch.cuda.is_available(),
                  f"--device {self.device}: no CUDA device is available here (use --device cpu or auto)")
        return self

    @staticmethod
    def _floats(text, name, n):
        if text is None:
            return None
        try:
            values = tuple(float(t) for t in str(text).split(","))
        except ValueError:
            values = ()
        if len(values) != n or not all(math.isfinite(v) for v in values):
            raise ConfigError(f"--{name} must be {n} comma-separated numbers; got {text!r}")
        return values

    def tau_value(self) -> float:
        """The DP-SynGen stage threshold: --tau, or the elbow of the variant's stage."""
        if self.tau is not None:
            return float(self.tau)
        from .syngen import thresholds

        return thresholds()["coarse" if self.syngen == "coarse" else "cleaning"]

    def sigma_range_values(self) -> tuple[float, float] | None:
        r = self._floats(self.sigma_range, "sigma-range", 2)
        if r is not None and not 0 < r[0] < r[1]:
            raise ConfigError(f"--sigma-range LO,HI needs 0 < LO < HI; got {self.sigma_range!r}")
        return r

    def sigma_bias_values(self) -> tuple[float, float, float] | None:
        b = self._floats(self.sigma_bias, "sigma-bias", 3)
        if b is not None and not (0 < b[0] < b[1] and 0 <= b[2] <= 1):
            raise ConfigError(f"--sigma-bias LO,HI,W needs 0 < LO < HI and 0 <= W <= 1; got {self.sigma_bias!r}")
        return b

    def to_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v, tuple) else v
                for f, v in ((f, getattr(self, f.name)) for f in fields(self))}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown config fields {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# Fields that may differ when a run is resumed; every other field must match the checkpoint.
RUN_CONTROL_FIELDS = ("device", "threads", "checkpoint_every", "checkpoint_seconds", "max_steps",
                      "time_budget", "epsilon_every_seconds", "grid_every", "grid_size", "sampler",
                      "sample_steps", "guidance", "max_physical_batch_size", "backend", "data_dir",
                      "adopt_copied_run", "deterministic_resume")


def _dpdm(eps: float) -> TrainConfig:
    return TrainConfig(target_epsilon=eps)


def _mepf(eps: float) -> TrainConfig:
    return TrainConfig(recipe="dp-mepf", target_epsilon=eps, steps=2000, batch_size=100, lr=1e-3, nf=16,
                       ema_decay=0.99, multiplicity=1, checkpoint_every=500, grid_every=0, device="auto")


# public data of the shipped pre-trained model: everything that exists on a fresh machine
PUBLIC_MIX = "digits+photos+faces+dead-leaves"
# CPU, a few minutes on 2 cores: all of Fashion-MNIST average-pooled to 14x14 (each row ~4x
# cheaper than 28x28), a 180k-parameter U-Net, 200 DP-SGD steps at eps=10, delta=1e-5. Using the
# full data set (q = 128/60000) amplifies privacy, so the noise stays moderate at eps=10; what
# limits sample quality here is the compute. One thread: these ops are too small to gain from
# more, and on a shared machine OpenMP threads that wait for each other are several times slower
# (--threads 0 keeps PyTorch's default).
_DEMO = TrainConfig(resolution=14, nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                    multiplicity=1, batch_size=128, steps=200, lr=2e-3, ema_decay=0.99,
                    max_physical_batch_size=256, target_epsilon=10.0, sample_steps=25,
                    grid_every=0, checkpoint_every=50, device="cpu", threads=1)

_SYNGEN = _DEMO.replace(recipe="dp-syngen", public_data="dead-leaves:20000", pretrain_steps=400)
# DP-SAD at the demo's size: a DP teacher 1.5x the demo U-Net's width (200 steps), then the demo U-Net as
# the student (200 steps), distilled against a discriminator; one sigma over both, for eps=10 in total
_SAD = _DEMO.replace(recipe="dp-sad", sad_teacher_steps=200, sad_teacher_nf=24)

PRESETS: dict[str, TrainConfig] = {
    "demo": _DEMO,
    "dpdm-fmnist-eps10": _dpdm(10.0),
    "dpdm-fmnist-eps1": _dpdm(1.0),
    "dpdm-fmnist-eps0.2": _dpdm(0.2),
    # Public pre-training of the demo's U-Net (no private data; `dpfast pretrain`): the shipped
    # builtin:demo14 checkpoint is this preset's run (dpfast/pretrained/README.md)
    "pretrain-demo14": _DEMO.replace(recipe="pretrain", public_data=PUBLIC_MIX, num_classes=10, steps=1500,
                                     private=False, target_epsilon=None, checkpoint_every=250),
    # DP-Diffusion (Ghalebikesabi et al.): full fine-tuning of the public model with augmentation
    # multiplicity (flips and crops, K rows per sample reduced by the engine's multiplicity) and biased
    # noise-level sampling (half the rows from sigma in [0.2, 3]: the paper's exact mixture of timestep
    # ranges could not be sourced, see the README)
    "dp-diffusion-demo": _DEMO.replace(recipe="dp-diffusion", init_from="builtin:demo14", multiplicity=4,
                                       augment="flip+crop", crop_padding=1, sigma_bias="0.2,3.0,0.5",
                                       max_physical_batch_size=64),
    # DP-LoRA (Tsai et al.): rank-4 adapters on the public model, on the attention projections and
    # (the demo U-Net has attention only in its middle block) the convolutions; only the adapters train
    "dp-lora-demo": _DEMO.replace(recipe="dp-lora", init_from="builtin:demo14", trainable="lora:4+conv",
                                  lr=5e-3),
    # DP-LDM (Lyu et al.): a public autoencoder (14x14 -> 7x7x3), a latent U-Net with attention at 7x7
    # pre-trained on public latents in the same run, then DP fine-tuning of attention + class embedding
    "dp-ldm-demo": _DEMO.replace(recipe="dp-ldm", nf=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(7,),
                                 public_data=PUBLIC_MIX, pretrain_steps=600, trainable="attention"),
    # DPDM from the public model: the demo with --init-from only (the README's comparison)
    "demo-pretrained": _DEMO.replace(init_from="builtin:demo14"),
    # DP-SynGen (Choi et al.): 400 public steps on generated dead leaves for one stage (the elbow rule's
    # tau; dpfast syngen-threshold), then the demo's DP-SGD on the other stages; the public phase's
    # model serves its stage when sampling. finetune: dead leaves at every noise level, then DP fine-tuning
    "syngen-coarse": _SYNGEN.replace(syngen="coarse"),
    "syngen-cleaning": _SYNGEN.replace(syngen="cleaning"),
    "syngen-finetune": _SYNGEN.replace(syngen="finetune"),
    # DP-SAD (Liu et al.): end to end private (the teacher by DP-SGD, composed into epsilon; the
    # discriminator inside the student's release); nodisc: the paper's ablation without the discriminator;
    # paper: the paper's setting, a teacher WITHOUT DP (its report says end_to_end: false)
    "dp-sad-demo": _SAD,
    "dp-sad-nodisc-demo": _SAD.replace(sad_adv_weight=0.0),
    "dp-sad-paper-demo": _SAD.replace(sad_teacher="nonprivate"),
    # DP-MEPF at 28x28 on CPU: one release, then 2000 generator steps of 100 images
    "dp-mepf-eps10": _mepf(10.0),
    "dp-mepf-eps1": _mepf(1.0),
}


def get_preset(name: str, **overrides) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]
    bad = sorted(set(overrides) - {f.name for f in fields(TrainConfig)})
    if bad:
        raise ValueError(f"unknown config fields {bad}")
    return cfg.replace(**overrides)
