"""Exponential moving average of a model's parameters.

EMA is post-processing of the privatised parameters, so it costs no privacy. It is updated once per
*logical* step (when the DP optimizer actually stepped), never per physical chunk.
Like score_sde / DPDM's `ExponentialMovingAverage(use_num_updates=True)`, the decay is warmed up as
min(decay, (1 + n) / (10 + n)) so that short runs do not average in the random initialisation.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class EMA:
    def __init__(self, module: nn.Module, decay: float = 0.999, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = {name: p.detach().clone() for name, p in module.named_parameters()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        decay = self.current_decay()
        self.num_updates += 1
        for name, p in module.named_parameters():
            self.shadow[name].lerp_(p.detach(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> nn.Module:
        """Loads the averaged parameters into `module` (buffers are left as they are)."""
        for name, p in module.named_parameters():
            p.copy_(self.shadow[name])
        return module

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.warmup = state["warmup"]
        self.num_updates = state["num_updates"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
