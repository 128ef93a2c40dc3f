"""Runs made of phases.

A phase names its data (the private set, or a public source of `dpfast.diffusion.public`), how many
logical steps it takes, which parameters it trains, the noise levels it sees, and whether it is
private. The trainer runs the phases in order; a checkpoint records the phase it was written in, so a
run resumes inside a phase or at a boundary exactly as if it had never stopped.

The privacy argument: only a private phase reads the private data set, and it reads it only through
the engine's Poisson loader (clipped, noised, accounted). A public phase reads the public source
only: its updates are a function of public data and of the model state it starts from, so it
costs nothing, and composing it with the private phases is post-processing before or after them.
The accountant therefore composes exactly the private phases' (sigma, q, steps), and the privacy
report lists every phase with its cost (0 for public ones). `tests/diffusion/test_phases.py` checks
both: the run's epsilon equals one accountant over the private phases alone, and a public phase
never touches the private set.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Phase:
    name: str
    data: str                                  # "private" or a public source (name, path, a+b)
    steps: int
    trainable: str = "all"
    sigma_range: tuple[float, float] | None = None
    sigma_bias: tuple[float, float, float] | None = None
    private: bool = False                      # DP-SGD through the engine (only on private data)

    @property
    def public(self) -> bool:
        return self.data != "private"

    def to_dict(self) -> dict:
        d = asdict(self)
        # JSON has no infinity: an open upper end is written as null
        d["sigma_range"] = [v if math.isfinite(v) else None for v in self.sigma_range] if self.sigma_range else None
        d["sigma_bias"] = list(self.sigma_bias) if self.sigma_bias else None
        return d


def plan_phases(cfg, private_steps: int) -> list[Phase]:
    """The phases of a run of cfg: an optional public pre-training phase (cfg.pretrain_steps on
    cfg.public_data, all parameters, the default noise levels), then the phase on the private data
    (cfg.trainable, cfg.sigma_range, cfg.sigma_bias; DP-SGD unless --no-private). A `pretrain` run is
    its public phase only, and never opens the private data."""
    if cfg.recipe == "pretrain":
        return [Phase("pretrain", cfg.public_data, int(cfg.steps), "all", cfg.sigma_range_values(),
                      cfg.sigma_bias_values(), private=False)]
    if cfg.recipe == "dp-syngen":
        return _syngen_phases(cfg, private_steps)
    phases = []
    if cfg.pretrain_steps:
        phases.append(Phase("pretrain", cfg.public_data, int(cfg.pretrain_steps), "all", private=False))
    phases.append(Phase("private-fine-tune" if (cfg.init_from or cfg.pretrain_steps) else "private",
                        "private", int(private_steps), cfg.trainable, cfg.sigma_range_values(),
                        cfg.sigma_bias_values(), private=bool(cfg.private)))
    return _checked(phases, cfg)


def _checked(phases: list[Phase], cfg) -> list[Phase]:
    for p in phases:
        if p.private and p.public:
            raise ValueError(f"phase {p.name}: a private phase reads the private data")
        if cfg.private and p.data == "private" and not p.private:
            # a private run reads the private data only through DP-SGD: a non-DP phase on it would
            # leave the reported epsilon false
            raise ValueError(f"phase {p.name}: a private run reads the private data only in its DP-SGD phase")
    return phases


def _syngen_phases(cfg, private_steps: int) -> list[Phase]:
    """DP-SynGen (dpfast.diffusion.syngen): generated images for one stage (or all of them), then
    the private data for the rest."""
    from .syngen import stage_ranges
    from .synthetic import parse_generated

    if cfg.syngen == "finetune":   # every noise level in the public phase; --sigma-range for the private one
        public_range, private_range = None, cfg.sigma_range_values()
    else:
        public_range, private_range = stage_ranges(cfg.syngen, cfg.tau_value())
    stage = {"coarse": "coarse", "cleaning": "cleaning", "finetune": "all"}[cfg.syngen]
    rest = {"coarse": "context+cleaning", "cleaning": "coarse+context", "finetune": "all"}[cfg.syngen]
    generated = all(parse_generated(part) is not None for part in cfg.public_data.split("+"))
    return _checked(cfg=cfg, phases=[
        Phase(f"{'synthetic' if generated else 'public'}-{stage}", cfg.public_data, int(cfg.pretrain_steps),
              "all", public_range, private=False),
        Phase(f"private-{rest}", "private", int(private_steps), cfg.trainable, private_range,
              cfg.sigma_bias_values(), private=bool(cfg.private))])


def phase_starts(phases: list[Phase]) -> list[int]:
    starts, at = [], 0
    for p in phases:
        starts.append(at)
        at += p.steps
    return starts

