"""nn.Linear on 2-D and N-D inputs (batch rows first): the rule every projection uses.

Weight gradient of sample i: ``sum_t g_t a_t^T`` over its K rows and T tokens (p x d).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _norms
from .base import Rule, Target, autocast_cast, scale_rows, trainable
from .backends import linear_clipped_wgrad, linear_weight_norm_sq


class _LinearFn(torch.autograd.Function):
    """y = x W^T + b whose backward returns only the input gradient and feeds the tape."""

    @staticmethod
    def forward(ctx, x, weight, bias, tape, site):
        ctx.tape, ctx.site = tape, site
        ctx.save_for_backward(weight)
        site.saved["A"] = x.detach()
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, G):
        (weight,) = ctx.saved_tensors
        grad_x = G.matmul(weight) if ctx.needs_input_grad[0] else None
        ctx.tape.record_grad(ctx.site, G)
        return grad_x, None, None, None, None


def dp_linear(tape, rule, name: str, x, weight, bias, w_target: Target | None, b_target: Target | None):
    """Private ``F.linear``; targets name which parameter (block) each gradient belongs to."""
    targets = [t for t in (w_target, b_target) if t is not None]
    if not targets:
        return F.linear(x, weight, bias)
    if x.dim() < 2:
        raise ValueError(
            f"module {name!r}: a private Linear needs the batch rows in dim 0 of a >= 2-D input, got shape "
            f"{tuple(x.shape)}")
    (x, weight, bias), ctx = autocast_cast(x.device.type, x, weight, bias)
    site = tape.new_site(rule, name, targets, rows=x.shape[0], has_w=w_target is not None,
                         has_b=b_target is not None, weight=weight)
    with ctx:
        return _LinearFn.apply(x, weight, bias, tape, site)


class LinearRule(Rule):
    types = (nn.Linear,)

    def forward(self, tape, module, name, orig, x):
        w = Target(module.weight) if trainable(module.weight) else None
        b = Target(module.bias) if trainable(module.bias) else None
        return dp_linear(tape, self, name, x, module.weight, module.bias, w, b)

    @staticmethod
    def _grouped(site, tape):
        A, G = site.saved["A"], site.G
        R, d, p = A.shape[0], A.shape[-1], G.shape[-1]
        A3, G3 = A.reshape(R, -1, d), G.reshape(R, -1, p)
        return A3, G3

    def norm_shape(self, site, tape) -> tuple[int, int, int]:
        """(T, d, p) of the weight gradient's norm per sample: positions x K, inputs, outputs."""
        A3, G3 = self._grouped(site, tape)
        return tape.multiplicity * A3.shape[1], A3.shape[2], G3.shape[2]

    def norm_sq(self, site, tape):
        A3, G3 = self._grouped(site, tape)
        K = tape.multiplicity
        out = 0
        if site.saved["has_w"]:
            out = linear_weight_norm_sq(A3, G3, K, tape.backend, tape.method_of(site))
        if site.saved["has_b"]:
            out = out + _norms.per_sample_sum_sq(_norms.to_acc(G3).sum(dim=1), K)
        return out

    def per_sample_grads(self, site, tape, sl):
        A3, G3 = self._grouped(site, tape)
        K = tape.multiplicity
        Ag = _norms.to_acc(_norms.group_rows(A3, K)[sl])
        Gg = _norms.to_acc(_norms.group_rows(G3, K)[sl])
        out = []
        if site.saved["has_w"]:
            out.append(torch.bmm(Gg.transpose(1, 2), Ag))
        if site.saved["has_b"]:
            out.append(Gg.sum(dim=1))
        return out

    def clipped_grads(self, site, tape, s):
        A3, G3 = self._grouped(site, tape)
        out = []
        # fp32 whatever the inputs: the sum is never rounded to bf16/fp16 (see scale_rows)
        fused = None
        if site.saved["has_w"]:
            fused = linear_clipped_wgrad(A3, G3, s, tape.multiplicity, tape.backend)
        if fused is not None:  # bf16/fp16 on the triton backend: exact products, no copy of G
            out.append(fused)
            if site.saved["has_b"]:
                gb = G3.sum(dim=1, dtype=torch.float32)
                out.append((gb * s.to(gb.dtype).view(-1, 1)).sum(dim=0))
            return out
        Gs = scale_rows(G3, s)
        if site.saved["has_w"]:
            A2 = _norms.to_acc(A3).reshape(-1, A3.shape[-1])
            out.append(Gs.reshape(-1, Gs.shape[-1]).t().matmul(A2))
        if site.saved["has_b"]:
            out.append(Gs.sum(dim=(0, 1)))
        return out
