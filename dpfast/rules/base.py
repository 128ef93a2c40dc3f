"""What every per-sample gradient rule provides, and helpers they share."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .._precision import exact_fp32
from ..tape import Site, Tape, Target


class Rule:
    """One layer type's per-sample gradient maths.

    forward(tape, module, name, orig_forward, *args, **kwargs)  the private forward; registers sites
    absorb(site, G)                      keep what the norm and the clipped sum need from backward
    norm_sq(site, tape) -> (B,)          raw squared norm of each sample's gradient (all targets)
    per_sample_grads(site, tape, sl)     per-sample gradients of samples ``sl`` (shared parameters)
    clipped_grads(site, tape, s)         ``sum_r s[r] * grad_r`` for each target
    release(site)                        drop saved tensors
    """

    types: tuple[type, ...] = ()
    composite = False  # True: the rule also covers its children's parameters (nn.MultiheadAttention)

    def matches(self, module: nn.Module) -> bool:
        # Exact forward only: a subclass that overrides forward computes something else.
        return isinstance(module, self.types) and any(
            type(module).forward is t.forward for t in self.types)

    def check(self, module: nn.Module, name: str) -> None:
        """Raise UnsupportedModuleError for a configuration the rule cannot make private."""

    def covered_params(self, module: nn.Module) -> list[nn.Parameter]:
        return list(module.parameters(recurse=self.composite))

    def absorb(self, site: Site, G: torch.Tensor) -> None:
        site.G = G

    def release(self, site: Site) -> None:
        site.saved = {}
        site.G = None


def trainable(p: torch.Tensor | None) -> bool:
    return p is not None and p.requires_grad


def targets_of(*params: torch.Tensor | None) -> list[Target]:
    return [Target(p) for p in params if trainable(p)]


def autocast_cast(device_type: str, *tensors):
    """Cast floating tensors as autocast would for a matmul-class op; returns (tensors, context)."""
    if device_type in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        cast = tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
        return cast, torch.autocast(device_type, enabled=False)
    return tensors, contextlib.nullcontext()


def scale_rows(G: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """G: (R, ...) times s: (R,) broadcast over the trailing dims, in fp32 (fp64 stays fp64).

    Never in bf16/fp16: the clipped sum is what the noise must cover, and rounding s*G (or the sum)
    to 8 mantissa bits moves it by ~2^-9 of its size, which for B aligned samples is a sizeable
    fraction of max_grad_norm (0.43 C at B=256 in tests/test_low_precision_privacy.py): a
    data-dependent error the accountant does not see."""
    acc = torch.float64 if G.dtype == torch.float64 else torch.float32
    return G.to(acc) * s.to(acc).view(-1, *([1] * (G.dim() - 1)))


__all__ = ["Rule", "Site", "Tape", "Target", "trainable", "targets_of", "autocast_cast", "scale_rows",
           "exact_fp32"]
