"""GroupNorm and LayerNorm: the affine part ``y = x_hat * w + b`` is the only trainable piece.

The per-row gradients of the affine parameters are small (rows x C), so backward keeps them instead of
``x_hat`` and ``G``: ``grad_w[r] = sum(x_hat * G)`` and ``grad_b[r] = sum(G)`` over the non-parameter
dims.

GroupNorm runs as one fused op with its affine part, as in non-private training (``native_group_norm``).
Its backward is one call of the library's as well, which returns the input gradient and, with the
batch passed as one row of N x C channels (see ``_GroupNormFn.backward``), every row's affine
gradients ``g_w = (sum G x - sum G * mean) * rstd`` and ``g_b = sum G``: the per-channel sums the
library forms anyway for the input gradient, kept per row instead of summed over the batch. Nothing
of ``x_hat``, the affine output or ``x_hat * G`` is written. LayerNorm normalises first and applies
the affine part as its own op.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import _norms
from .base import Rule, Target, trainable


class _AffineFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xh, weight, bias, tape, site, view):
        ctx.tape, ctx.site, ctx.view = tape, site, view
        ctx.save_for_backward(weight)
        site.saved["xh"] = xh.detach()
        y = xh
        if weight is not None:
            y = y * weight.view(view)
        if bias is not None:
            y = y + bias.view(view)
        return y

    @staticmethod
    def backward(ctx, G):
        (weight,) = ctx.saved_tensors
        grad_xh = None
        if ctx.needs_input_grad[0]:
            grad_xh = G * weight.view(ctx.view) if weight is not None else G
        ctx.tape.record_grad(ctx.site, G)
        return grad_xh, None, None, None, None, None


class _AffineRule(Rule):
    def _affine(self, tape, name, module, xh, view, reduce_dims):
        w = Target(module.weight) if trainable(module.weight) else None
        b = Target(module.bias) if trainable(module.bias) else None
        site = tape.new_site(self, name, [t for t in (w, b) if t is not None], rows=xh.shape[0],
                             has_w=w is not None, has_b=b is not None, reduce_dims=reduce_dims)
        return _AffineFn.apply(xh, module.weight, module.bias, tape, site, view)

    def absorb(self, site, G):
        xh = site.saved.pop("xh")
        dims = site.saved["reduce_dims"]
        G = _norms.to_acc(G)
        if site.saved["has_w"]:
            site.saved["gw"] = (_norms.to_acc(xh) * G).sum(dim=dims) if dims else _norms.to_acc(xh) * G
        if site.saved["has_b"]:
            site.saved["gb"] = G.sum(dim=dims) if dims else G

    def _per_row(self, site):
        return [site.saved[k] for k in ("gw", "gb") if k in site.saved]

    def norm_sq(self, site, tape):
        return sum(_norms.per_sample_sum_sq(g, tape.multiplicity) for g in self._per_row(site))

    def per_sample_grads(self, site, tape, sl):
        K = tape.multiplicity
        return [g.reshape(-1, K, *g.shape[1:]).sum(dim=1)[sl] for g in self._per_row(site)]

    def clipped_grads(self, site, tape, s):
        return [(g * s.to(g.dtype).view(-1, *([1] * (g.dim() - 1)))).sum(dim=0) for g in self._per_row(site)]


MAX_GROUPS_PER_CALL = 65535  # CUDA's grid y-limit, which PyTorch's GroupNorm backward launches groups on


class _GroupNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, tape, site, groups, eps):
        N, C = x.shape[:2]
        y, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, N, C, math.prod(x.shape[2:]), groups, eps)
        ctx.tape, ctx.site, ctx.groups = tape, site, groups
        ctx.save_for_backward(x, mean, rstd, weight)
        site.saved["x"] = x.detach()  # for the two-pass input fingerprint; absorb drops it
        return y

    @staticmethod
    def backward(ctx, G):
        """One call of the library's backward gives the input gradient and every row's affine
        gradients: the batch of N rows of C channels in ``groups`` groups is passed as one row of
        N x C channels in N x groups groups. A group is a block of C / groups consecutive channels of
        one row either way, so each group's mean, rstd and the input gradient are the same maths, and
        the "batch" weight and bias gradients it returns, summed over a batch of one, are the per-row
        ``(sum G x - sum G * mean) * rstd`` and ``sum G`` of each (row, channel)."""
        x, mean, rstd, weight = ctx.saved_tensors
        site = ctx.site
        G = G.contiguous()
        N, C = x.shape[:2]
        has_w, has_b = site.saved["has_w"], site.saved["has_b"]
        HxW, groups = math.prod(x.shape[2:]), ctx.groups
        # CUDA launches one block row per group: at most 65535 groups per call, so rows go in chunks
        step = max(1, MAX_GROUPS_PER_CALL // groups)
        parts = []
        for r0 in range(0, N, step):
            r1 = min(N, r0 + step)
            w_rows = weight.repeat(r1 - r0) if weight is not None else None
            parts.append(torch.ops.aten.native_group_norm_backward(
                G[r0:r1], x[r0:r1], mean[r0:r1], rstd[r0:r1], w_rows, 1, (r1 - r0) * C, HxW,
                (r1 - r0) * groups, [ctx.needs_input_grad[0], has_w, has_b]))
        grad_x, gw, gb = (None if parts[0][j] is None else parts[0][j] if len(parts) == 1 else
                          torch.cat([p[j] for p in parts]) for j in range(3))
        # handed to absorb, which runs after record_grad's checks: a refused second backward (retain_graph)
        # must not overwrite the gradients whose norms were already taken
        site.pending = (gw.view(N, C) if has_w else None, gb.view(N, C) if has_b else None)
        ctx.tape.record_grad(site, G)
        return grad_x, None, None, None, None, None, None


class GroupNormRule(_AffineRule):
    types = (nn.GroupNorm,)

    def forward(self, tape, module, name, orig, x):
        if not (trainable(module.weight) or trainable(module.bias)):
            return orig(x)
        if torch.is_autocast_enabled(x.device.type):
            x = x.float()  # autocast runs group_norm in fp32
        params = [p for p in (module.weight, module.bias) if p is not None]
        if x.dim() < 2 or not x.numel() or x.dtype not in (torch.float32, torch.float64) or \
                any(p.dtype != x.dtype for p in params):
            # empty, half precision (mean and rstd would be rounded to it before the subtraction in
            # absorb: 10x the error of normalising first), mixed dtypes: normalise, then the affine op
            xh = F.group_norm(x, module.num_groups, None, None, module.eps)
            view = (1, -1) + (1,) * (x.dim() - 2)
            return self._affine(tape, name, module, xh, view, tuple(range(2, x.dim())))
        w = Target(module.weight) if trainable(module.weight) else None
        b = Target(module.bias) if trainable(module.bias) else None
        site = tape.new_site(self, name, [t for t in (w, b) if t is not None], rows=x.shape[0],
                             has_w=w is not None, has_b=b is not None, groups=module.num_groups)
        return _GroupNormFn.apply(x.contiguous(), module.weight, module.bias, tape, site, module.num_groups,
                                  module.eps)

    def absorb(self, site, G):
        if "groups" not in site.saved:  # the normalise-then-affine path
            return super().absorb(site, G)
        # the fused backward computed each row's gw and gb (fp32 or fp64, as the layer)
        site.saved.pop("x", None)
        (gw, gb), site.pending = site.pending, None
        if gw is not None:
            site.saved["gw"] = gw
        if gb is not None:
            site.saved["gb"] = gb


class LayerNormRule(_AffineRule):
    types = (nn.LayerNorm,)

    def forward(self, tape, module, name, orig, x):
        if not (trainable(module.weight) or trainable(module.bias)):
            return orig(x)
        shape = tuple(module.normalized_shape)
        if x.dim() < len(shape) + 1:
            raise ValueError(f"module {name!r}: a private LayerNorm needs batch rows before the normalized "
                             f"dims {shape}, got input of shape {tuple(x.shape)}")
        xh = F.layer_norm(x, shape, None, None, module.eps)
        return self._affine(tape, name, module, xh, shape, tuple(range(1, x.dim() - len(shape))))
