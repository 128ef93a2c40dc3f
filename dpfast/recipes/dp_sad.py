"""DP-SAD (Liu et al., "Learning differentially private diffusion models via stochastic adversarial
distillation"), with a guarantee that holds end to end.

The paper trains a teacher on the private data, then a student distilled from it at one random
timestep per sample, against a discriminator that tells teacher outputs from student outputs; only the
student's gradients are clipped and noised. Its teacher and its discriminator see the private data
without protection, so the student's gradients depend on the whole data set through them, and
clipping each sample's gradient bounds none of that. dpfast covers every path from the private data to
the released student:

- **Teacher** (accountant phase ``teacher``): a DPDM run with DP-SGD on the private data, in
  ``out/teacher`` (its own checkpoint, ledger and privacy report). Frozen afterwards, the teacher is a
  function of its noisy releases only. Its history is composed into the student's engine before the
  student's first release (``PrivacyEngine.compose_after``: adaptive composition of the two phases,
  each with its own seed, hence its own noise keys and independent Poisson batches), so the reported
  epsilon is that of teacher and student together, and the student's noise is calibrated for what the
  teacher left of the budget. ``--sad-teacher nonprivate`` is the paper's setting: the teacher is
  trained without DP, so the run is not DP at all (not even the student's own engine's epsilon holds,
  by the argument above). The report says so: ``epsilon`` infinite, ``guarantee_lost`` naming the
  teacher, ``"end_to_end": false``, and the student engine's number only as
  ``epsilon_if_teacher_were_public``.
- **Discriminator** (accountant phase ``student``): it does touch the private data (its inputs are
  built from private images), so it is trained inside the student's release. The engine makes one
  module of student and discriminator private, and each sample's loss is the student's distillation
  loss plus the discriminator's loss, whose gradient reaches the student through a gradient-reversal
  layer (the student maximises what the discriminator minimises). One backward gives every parameter
  of both models its gradient; each sample's gradient over both is clipped to C as one vector and
  noised once: one Gaussian mechanism per step, plain DP-SGD over the pair, no extra privacy cost. The
  discriminator's weights are therefore a function of noisy releases only, and so is every later
  student gradient that flows through it.
- **Student** (accountant phase ``student``): each sample's K rows (a random noise level each, the
  paper's random timestep r, times noise multiplicity) are reduced together by the engine's
  ``multiplicity``: the clip bounds the sample, not a row.

What the teacher spent is read from its checkpoint and its ledger (releases after a checkpoint that
was put back stay charged), and the student's checkpoint binds the teacher by a hash of its weights
and its release count: a resumed student refuses any other teacher, and no second teacher is trained
beside an existing student.

``tests/diffusion/test_dp_sad.py`` checks each path: epsilon equals one accountant over the teacher's
and the student's histories (with the teacher ledger's later releases); the teacher's and the student's
engines have different seeds (a shared one is refused); the discriminator's parameters are inside the
engine and change only through its releases (its per-sample gradient is clipped with the student's: the
whole pair moves by at most C per sample before noise); a resumed student refuses a teacher that
changed; the paper's setting is reported as not differentially private.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpfast.diffusion.edm import edm_draws, edm_loss_weight
from dpfast.diffusion.presets import RUN_CONTROL_FIELDS, ConfigError, TrainConfig
from dpfast.diffusion.trainer import Trainer, prepare_dataset, sample_rate_of, total_steps_of

# guarantee_lost of a private run with --sad-teacher nonprivate
NONPRIVATE_TEACHER = ("the teacher was trained on the private data without differential privacy (--sad-teacher "
                      "nonprivate): the student learns the data through it, so clipping the student's gradients "
                      "bounds nothing")


# ----------------------------------------------------------------------------- the models
class _ReverseGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -scale."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -ctx.scale * g, None


class Discriminator(nn.Module):
    """A small conv net over (the noisy input, output A, output B, the noise level): the logit that A
    is the teacher's output (and B the student's). Plain convolutions and SiLU (no normalisation
    layer: nothing mixes samples)."""

    def __init__(self, channels: int, nf: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3 * channels + 1, nf, 3, padding=1), nn.SiLU(),
            nn.Conv2d(nf, 2 * nf, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * nf, 2 * nf, 3, stride=2, padding=1), nn.SiLU())
        self.head = nn.Linear(2 * nf, 1)

    def forward(self, x_in, a, b, c_noise):
        level = c_noise.reshape(-1, 1, 1, 1).expand(x_in.shape[0], 1, *x_in.shape[2:])
        h = self.body(torch.cat([x_in, a, b, level], dim=1))
        return self.head(h.mean(dim=(2, 3))).flatten()


class StudentPair(nn.Module):
    """The module the engine makes private: the student and (if the adversarial term is on) the
    discriminator, so that one release clips and noises both."""

    def __init__(self, student: nn.Module, discriminator: Discriminator | None, adv_weight: float,
                 disc_weight: float):
        super().__init__()
        self.student = student
        self.discriminator = discriminator
        self.adv_weight, self.disc_weight = float(adv_weight), float(disc_weight)

    def forward(self, x_noisy, sigma, labels, teacher_out, teacher_first):
        """Per row: (student output, discriminator loss or None). teacher_first (bool per row) puts the
        teacher's output in slot A; the discriminator's target is that flag."""
        out = self.student(x_noisy, sigma, labels)
        if self.discriminator is None:
            return out, None
        # the discriminator descends its loss; the student, through the reversal, ascends it with
        # weight adv_weight (the reversal's scale undoes disc_weight, which scales the whole term)
        s = _ReverseGrad.apply(out, self.adv_weight / self.disc_weight)
        flag = teacher_first.reshape(-1, 1, 1, 1)
        a, b = torch.where(flag, teacher_out, s), torch.where(flag, s, teacher_out)
        sd2 = self.student.sigma_data ** 2
        sig = sigma.reshape(-1, 1, 1, 1)
        logit = self.discriminator(x_noisy / (sig ** 2 + sd2).sqrt(), a, b, sigma.log() / 4)
        return out, F.binary_cross_entropy_with_logits(logit, teacher_first.to(logit.dtype), reduction="none")


def sad_loss_rows(pair: StudentPair, teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor | None,
                  multiplicity: int, p_mean: float, p_std: float, label_dropout: float, generator,
                  num_classes: int, sigma_data: float, augment=None, generators=None) -> torch.Tensor:
    """(B*K,) per-row losses of one step: the EDM-weighted distillation loss at one random noise level
    per row (teacher and student see the same noisy input and labels) plus disc_weight x the
    discriminator's loss. Rows are sample-major, as the engine's multiplicity expects. Randomness:
    ``generator`` in batch order, or ``generators``, one per sample, for private steps (edm_draws)."""
    x, y, sigma, noise, u = edm_draws(images, labels, multiplicity, p_mean=p_mean, p_std=p_std,
                                      label_dropout=label_dropout, augment=augment, generator=generator,
                                      generators=generators, num_classes=num_classes, coins=1)
    sig = sigma.reshape(-1, 1, 1, 1)
    x_noisy = x + sig * noise
    with torch.no_grad():
        target = teacher(x_noisy, sigma, y)
    teacher_first = u[:, 0] < 0.5
    out, disc_loss = pair(x_noisy, sigma, y, target, teacher_first)
    rows = (edm_loss_weight(sig, sigma_data) * (out - target) ** 2).flatten(1).mean(dim=1)
    if disc_loss is not None:
        rows = rows + pair.disc_weight * disc_loss
    return rows


# ----------------------------------------------------------------------------- the teacher
def teacher_config(cfg: TrainConfig, noise_multiplier: float | None) -> TrainConfig:
    """The teacher's DPDM run: the student's data, batch, multiplicity and loss; its own width, steps
    and engine seed (a pinned seed is moved: the two engines must never share noise keys)."""
    defaults = {f: getattr(TrainConfig, f) for f in TrainConfig.__dataclass_fields__ if f.startswith("sad_")}
    private = cfg.private and cfg.sad_teacher == "dp"
    return cfg.replace(recipe="dpdm", nf=cfg.sad_teacher_nf, steps=cfg.sad_teacher_steps, private=private,
                       target_epsilon=None, noise_multiplier=noise_multiplier if private else None,
                       noise_seed=None if cfg.noise_seed is None else (cfg.noise_seed + 0x5AD) % (1 << 63),
                       max_steps=None, grid_every=0, **defaults)


def _fingerprint(weights: dict) -> str:
    """SHA-256 of a state dict's tensors (names, dtypes, shapes, bytes)."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(weights):
        t = weights[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class SADTrainer(Trainer):
    """The student's run (its checkpoint, ledger and report in --out); the teacher's run in out/teacher
    comes first, in train()."""

    def __init__(self, cfg: TrainConfig, out_dir, dataset=None, progress: bool = True, log=print):
        self._sad_started = time.monotonic()
        self._sad_args = (cfg, out_dir, dataset, progress, log)
        self.teacher_dir = Path(out_dir) / "teacher"
        self._ready = False
        self.lock = None
        self._sad_log = log
        if (self.teacher_dir / "model.pt").exists() and self._teacher_finished():
            self._setup()

    # -- the teacher
    def _teacher_finished(self) -> bool:
        import json

        report = self.teacher_dir / "privacy_report.json"
        try:
            return bool(json.loads(report.read_text()).get("complete"))
        except (OSError, ValueError):
            return False

    def _shared_noise(self, cfg: TrainConfig, dataset) -> float | None:
        """The one noise multiplier of the teacher and the student: both have the same sample rate, so
        sigma calibrated for teacher_steps + student_steps spends the target over both; the student's
        own calibration (over the teacher's real history) then lands on the same value."""
        if not (cfg.private and cfg.sad_teacher == "dp"):
            return None
        if cfg.noise_multiplier is not None:
            return float(cfg.noise_multiplier)
        from dpfast.accounting import calibrate_noise_multiplier

        data = prepare_dataset(cfg, dataset)
        steps = cfg.sad_teacher_steps + total_steps_of(cfg, len(data))
        return float(calibrate_noise_multiplier(cfg.target_epsilon, cfg.delta, sample_rate_of(cfg, len(data)),
                                                steps=steps, accountant=cfg.accountant))

    def _train_teacher(self) -> dict:
        from dpfast.diffusion.trainer import train

        cfg, _, dataset, progress, log = self._sad_args
        cfg.validate()
        tcfg = teacher_config(cfg, self._shared_noise(cfg, dataset))
        log(f"DP-SAD: training the teacher ({'DP-SGD' if tcfg.private else 'WITHOUT differential privacy'}, "
            f"nf={tcfg.nf}, {tcfg.steps} steps) in {self.teacher_dir}")
        return train(tcfg, self.teacher_dir, dataset=dataset, progress=progress,
                     log=lambda *a, **k: log("teacher:", *a, **k))

    def _setup(self) -> None:
        cfg, out_dir, dataset, progress, log = self._sad_args
        from dpfast.diffusion.trainer import load_denoiser

        state = torch.load(self.teacher_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
        self.teacher_cfg = TrainConfig.from_dict(state["config"])
        expected = teacher_config(cfg, self.teacher_cfg.noise_multiplier)
        if any(getattr(self.teacher_cfg, k) != getattr(expected, k) for k in expected.to_dict()
               if k not in RUN_CONTROL_FIELDS):
            raise ConfigError(f"{self.teacher_dir} holds a teacher trained with other settings than this run's "
                              "(--sad-teacher-*, data, batch, seeds): use another --out")
        model_state = torch.load(self.teacher_dir / "model.pt", map_location="cpu", weights_only=True)
        if model_state["step"] != state["step"] or state["step"] < self.teacher_cfg.steps:
            raise ConfigError(f"the teacher's model.pt (step {model_state['step']}) and checkpoint.pt (step "
                              f"{state['step']}) in {self.teacher_dir} are not one finished run (a checkpoint put "
                              "back?): use another --out")
        self.teacher_engine_state = None  # a teacher without DP
        if state.get("engine") is not None:
            # what the teacher spent: its checkpoint, plus every release its ledger records after it (a
            # checkpoint put back after later releases must not hide them)
            from dpfast import PrivacyEngine

            # read only: it counts what the finished teacher released and never releases with its keys, so a
            # teacher directory that was copied (with its ledger) is still charged in full
            spent = PrivacyEngine(accountant=self.teacher_cfg.accountant, ledger=self.teacher_dir / "privacy_ledger.jsonl",
                                  adopt_copied_ledger=True)
            try:
                spent.load_state_dict(state["engine"])
            except ValueError as e:  # e.g. a checkpoint its ledger does not know: its releases cannot be counted
                raise ConfigError(f"the teacher in {self.teacher_dir} cannot be charged: {e}") from e
            self.teacher_engine_state = spent.state_dict()
        self.teacher_steps = state["step"]
        self.teacher_fingerprint = _fingerprint(model_state["ema"])
        teacher, self.teacher_meta = load_denoiser(self.teacher_dir / "model.pt", "cpu")
        self.teacher = teacher.requires_grad_(False)
        super().__init__(cfg, out_dir, dataset, progress, log)
        self.teacher = self.teacher.to(self.device)
        self.started = self._sad_started  # --time-budget counts the teacher's time too
        try:
            self._check_bound_teacher()
        except ConfigError:
            self.lock.release()
            raise
        self._ready = True

    def _check_bound_teacher(self) -> None:
        """A resumed student refuses any teacher but the one it was trained with and composed with."""
        bound = (self.resume_state or {}).get("teacher")
        if bound is not None and (bound["sha256"] != self.teacher_fingerprint
                                  or bound["releases"] != self._teacher_releases()):
            raise ConfigError(f"the teacher in {self.teacher_dir} is not the one this student was trained with (it "
                              "was retrained, resumed or replaced, or its ledger records releases since): use another "
                              "--out")
        if self.engine is not None and self.teacher_engine_state is not None:
            from dpfast.ledger import run_id_of

            if [(p["run"], p["steps"]) for p in self.engine.prior_runs] != [
                    (run_id_of(self.teacher_engine_state), self._teacher_releases())]:
                raise ConfigError(f"the teacher in {self.teacher_dir} is not the one this student's epsilon was "
                                  "composed with (it was retrained, resumed or replaced): use another --out")

    def _teacher_releases(self) -> int:
        if self.teacher_engine_state is None:
            return 0
        return sum(int(n) for *_, n in self.teacher_engine_state["accountant"]["history"])

    def train(self) -> dict:
        if not self._ready:
            out = Path(self._sad_args[1])
            if (out / "checkpoint.pt").exists() or (out / "privacy_ledger.jsonl").exists():
                # a student exists, so its teacher finished once: a new teacher would be another release of
                # the data that no report covers together with the student
                raise ConfigError(f"{out} holds a DP-SAD student whose teacher in {self.teacher_dir} is missing or "
                                  "unfinished; training another teacher would spend privacy no report covers: use "
                                  "another --out")
            result = self._train_teacher()
            if not result["report"] or not result["report"].get("complete"):
                self._sad_log("DP-SAD: the teacher is not finished; run the same command again to resume it")
                return dict(result, status=f"stopped in the teacher ({result['reason']})")
            self._setup()
        return super().train()

    # -- the student: its engine covers the student and the discriminator
    def _prior_history(self) -> list:
        if self.teacher_engine_state is None:
            return []
        return [tuple(p) for p in self.teacher_engine_state["accountant"]["history"]]

    def _build_pair(self) -> StudentPair:
        if getattr(self, "pair", None) is None:
            cfg = self.cfg
            disc = None
            if cfg.sad_adv_weight > 0:
                torch.manual_seed(cfg.seed + 17)
                disc = Discriminator(self.image_shape[0], cfg.sad_disc_nf).to(self.device)
            self.pair = StudentPair(self.denoiser, disc, cfg.sad_adv_weight, cfg.sad_disc_weight)
        return self.pair

    def _enter_phase(self, index: int, fresh: bool) -> None:
        super()._enter_phase(index, fresh)
        if not self.phase.private:  # a run without DP: one optimizer over the pair as well
            self.optimizer = torch.optim.Adam(self._build_pair().parameters(), lr=self.cfg.lr)

    def _make_private(self, base_opt, resume: bool) -> None:
        pair = self._build_pair()
        denoiser = self.denoiser
        self.denoiser = pair  # make_private over the pair; the trainer's denoiser stays the student
        try:
            super()._make_private(torch.optim.Adam(pair.parameters(), lr=self.cfg.lr), resume)
        finally:
            self.denoiser = denoiser
        if not resume and self.teacher_engine_state is not None:
            # before the first release: from here on the engine's epsilon is teacher + student
            self.engine.compose_after(self.teacher_engine_state)

    def _chunk_loss(self, x, y, idx=None):
        cfg = self.cfg
        if len(x) == 0:
            return torch.zeros((), device=self.device), 0
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True) if self.num_classes else None
        private = self.phase.private
        rows = sad_loss_rows(self.model if private else self.pair, self.teacher, x, y, cfg.multiplicity,
                             cfg.p_mean, cfg.p_std, cfg.label_dropout, self.gen, self.num_classes,
                             cfg.sigma_data, self.augment, generators=self._record_generators(idx))
        if private:
            rows.mean().backward()
        else:
            (rows.sum() / (cfg.multiplicity * self._phase_q * len(self._phase_data))).backward()
        return rows.detach().sum(), rows.numel()

    def _checkpoint_extra(self) -> dict:
        disc = self.pair.discriminator if getattr(self, "pair", None) is not None else None
        # the teacher this student is bound to: a resume refuses any other
        return {"discriminator": None if disc is None else disc.state_dict(),
                "teacher": {"sha256": self.teacher_fingerprint, "releases": self._teacher_releases()}}

    def _load_extra(self, state: dict) -> None:
        disc = self._build_pair().discriminator
        if disc is not None:
            if state.get("discriminator") is None:
                raise ConfigError("the checkpoint has no discriminator: it is not a dp-sad run of these settings")
            disc.load_state_dict(state["discriminator"])

    # -- report
    def end_to_end(self) -> bool:
        return self.cfg.private and self.cfg.sad_teacher == "dp"

    def teacher_breaks_dp(self) -> bool:
        """A private student distilled from a teacher trained without DP: no epsilon holds for the run."""
        return self.cfg.private and not self.teacher_cfg.private

    def breaks_dp(self) -> bool:
        return self.teacher_breaks_dp()

    def _teacher_epsilon(self) -> float:
        if self.teacher_engine_state is None:
            return None
        if self.teacher_engine_state.get("no_privacy"):
            return math.inf
        from dpfast.accounting import epsilon_report

        history = self.teacher_engine_state["accountant"]["history"]
        return epsilon_report([tuple(p) for p in history], self.cfg.delta, self.cfg.accountant).epsilon if history else 0.0

    def _extra_phases(self) -> list[dict]:
        t = self.teacher_cfg
        row = {"name": "teacher", "data": "private", "steps": t.steps, "steps_done": self.teacher_steps,
               "trainable": f"teacher U-Net (nf={t.nf})", "private": t.private, "run": str(self.teacher_dir),
               "data_description": t.data_dir or (self.dataset.name if self.dataset is not None else None)}
        if t.private:
            row.update(noise_multiplier=t.noise_multiplier, sample_rate=self.q, epsilon=self._teacher_epsilon())
        else:
            row.update(epsilon=None, note="private data WITHOUT differential privacy (the paper's setting): the "
                       "run is NOT differentially private" if self.cfg.private else
                       "private data WITHOUT differential privacy")
        return [row]

    def privacy_report(self) -> dict:
        report = super().privacy_report()
        cfg = self.cfg
        student_eps = None
        if self.engine is not None:
            from dpfast.accounting import epsilon_report

            _, own = self.engine.accountant.split_history(self.engine.prior_steps)
            student_eps = math.inf if self.engine._no_privacy else (
                epsilon_report(own, cfg.delta, cfg.accountant).epsilon if own else 0.0)
        lost = self.teacher_breaks_dp()
        for row in report.get("phases", []):
            if row.get("name") != "teacher" and row.get("private"):
                if lost:
                    row.update(name="student", epsilon=math.inf, epsilon_if_teacher_were_public=student_eps,
                               note="the student and the discriminator, one release per step; NOT differentially "
                                    "private: distilled from a teacher trained without DP")
                else:
                    row.update(name="student", epsilon_alone=student_eps,
                               note="the student and the discriminator, one release per step; epsilon: teacher + "
                                    "student")
        if lost:
            # the engine's epsilon (no teacher composed in: it had no DP) would hold only for a teacher that
            # never saw the private data; every bound of this run is infinite
            why = report.get("guarantee_lost")
            fields = {}
            for k, v in report.items():
                if k == "epsilon":
                    fields.update(epsilon=math.inf, epsilon_if_teacher_were_public=v)
                elif k == "guarantee_lost":
                    fields[k] = NONPRIVATE_TEACHER + (f"; also: {why}" if why else "")
                else:
                    fields[k] = math.inf if k in ("epsilon_lower", "epsilon_estimate") else v
            report = fields
        e2e = self.end_to_end()
        report["end_to_end"] = e2e
        report["sad"] = {
            "teacher": {"mode": cfg.sad_teacher, "private": self.teacher_cfg.private, "nf": cfg.sad_teacher_nf,
                        "steps": self.teacher_steps, "releases_charged": self._teacher_releases(),
                        "epsilon": self._teacher_epsilon() if cfg.private else None,
                        "composed_into_epsilon": self.teacher_engine_state is not None, "run": str(self.teacher_dir)},
            "student": {"nf": cfg.nf, "steps": report.get("steps"),
                        ("epsilon_if_teacher_were_public" if lost else "epsilon_alone"): student_eps},
            "discriminator": None if cfg.sad_adv_weight == 0 else {
                "nf": cfg.sad_disc_nf, "adv_weight": cfg.sad_adv_weight, "disc_weight": cfg.sad_disc_weight,
                "privacy": "trained inside the student's release: its per-sample gradient is clipped with the "
                           "student's as one vector and noised once (no extra cost)"},
            "note": ("epsilon covers the teacher, the discriminator and the student (composed in one accountant)"
                     if e2e else "trained without differential privacy (--no-private)" if not cfg.private else
                     "NOT differentially private: the teacher was trained on the private data without "
                     "differential privacy (--sad-teacher nonprivate, the paper's setting), and the student and "
                     "the discriminator learn the data through it; epsilon_if_teacher_were_public is the "
                     "student's engine alone, which would hold only for a teacher that never saw the private "
                     "data")}
        return report

    def describe(self) -> str:
        t = self.teacher_cfg
        text = (super().describe() + f"; DP-SAD: teacher nf={t.nf}, {t.steps} steps "
                f"({'DP-SGD, composed into epsilon' if t.private else 'WITHOUT DP'}), "
                f"student nf={self.cfg.nf}, adversarial weight {self.cfg.sad_adv_weight:g}")
        if self.teacher_breaks_dp():
            text += "; this run is NOT differentially private (its teacher was trained without DP)"
        return text
