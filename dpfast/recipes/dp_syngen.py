"""DP-SynGen (Choi et al.): the coarse or the cleaning stage from generated images, DP-SGD on the
rest. The parts are `dpfast.diffusion.synthetic` (the generators), `dpfast.diffusion.syngen` (the
threshold tau, the stage ranges, the switching sampler, and the privacy argument) and the phases of
`dpfast.diffusion.phases` (`plan_phases` makes a dp-syngen run's two). This file keeps the stage
expert: the EMA model at the end of the public phase, frozen, saved in every later checkpoint and in
model.pt, and used by the sampler inside its noise-level range.
"""
from __future__ import annotations

import math

from dpfast.diffusion.trainer import Trainer


class SynGenTrainer(Trainer):
    def __init__(self, cfg, *args, **kwargs):
        self.experts = []  # [{"phase", "sigma_range", "ema", ...}]: the phase boundary adds one
        if cfg.tau is None and cfg.syngen in ("coarse", "cleaning"):
            # resolved once and saved in the checkpoint's config: a resume under another rule is refused
            # instead of moving the stage boundary in the middle of a run
            cfg = cfg.replace(tau=cfg.tau_value())
        super().__init__(cfg, *args, **kwargs)

    def _keeps_expert(self, phase) -> bool:
        return (self.cfg.stage_experts and self.cfg.syngen in ("coarse", "cleaning") and phase.public
                and phase.sigma_range is not None)

    def _enter_phase(self, index: int, fresh: bool) -> None:
        if fresh and self.phase is not None and self._keeps_expert(self.phase):
            # the public phase's EMA model, before the private phase starts from a copy of it: a
            # function of the generated images and the initial weights only
            ema = {k: v.detach().clone().cpu() for k, v in self.ema_model().state_dict().items()}
            # the public data's labels, if it has any, are not the private classes: the expert is
            # always given the null label
            self.experts.append({"phase": self.phase.name, "sigma_range": tuple(self.phase.sigma_range),
                                 "ema": ema, "private_data_used": False, "unconditional": True})
        super()._enter_phase(index, fresh)

    def _checkpoint_extra(self) -> dict:
        return {"experts": self.experts}

    def _load_extra(self, state: dict) -> None:
        self.experts = list(state.get("experts") or [])

    def _model_extra(self) -> dict:
        return {"experts": self.experts}

    def _sampling_model(self):
        from dpfast.diffusion.syngen import StageExperts

        model = self.ema_model()
        if not self.experts:
            return model
        if not hasattr(self, "_expert_models"):
            import copy

            self._expert_models = []
            for e in self.experts:
                m = copy.deepcopy(self.sample_model)
                m.load_state_dict(e["ema"])
                self._expert_models.append((*e["sigma_range"], m.eval(), e["unconditional"]))
        return StageExperts(model, self._expert_models)

    def privacy_report(self) -> dict:
        report = super().privacy_report()
        from dpfast.diffusion.syngen import stage_mass

        cfg = self.cfg
        staged = cfg.syngen in ("coarse", "cleaning")
        elbow = staged and cfg.tau == cfg.replace(tau=None).tau_value()
        report["syngen"] = {
            "variant": cfg.syngen, "tau": cfg.tau if staged else None,
            "tau_rule": ("elbow" if elbow else "--tau") if staged else None,
            "stage_experts": self._keeps_expert(self.phases[0]),
            "experts": [{"phase": e["phase"], "sigma_range": [v if math.isfinite(v) else None for v in e["sigma_range"]],
                         "unconditional": e["unconditional"], "private_data_used": False} for e in self.experts],
            "private_share_of_noise_levels": None if self.private_phase is None or self.private_phase.sigma_range is None
            else stage_mass(*self.private_phase.sigma_range, cfg.p_mean, cfg.p_std),
            "note": "the public phase and its expert see public data only (no privacy cost); epsilon is the "
                    "private phase's"}
        return report
