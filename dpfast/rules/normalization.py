"""GroupNorm and LayerNorm: the affine part ``y = x_hat * w + b`` is the only trainable piece.

The per-row gradients of the affine parameters are small (rows x C), so backward keeps them instead of
``x_hat`` and ``G``: ``grad_w[r] = sum(x_hat * G)`` and ``grad_b[r] = sum(G)`` over the non-parameter
dims. The normalisation itself runs through autograd as usual.
"""
from __future__ import annotations

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


class GroupNormRule(_AffineRule):
    types = (nn.GroupNorm,)

    def forward(self, tape, module, name, orig, x):
        if not (trainable(module.weight) or trainable(module.bias)):
            return orig(x)
        xh = F.group_norm(x, module.num_groups, None, None, module.eps)
        view = (1, -1) + (1,) * (x.dim() - 2)
        return self._affine(tape, name, module, xh, view, tuple(range(2, x.dim())))


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
