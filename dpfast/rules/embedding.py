"""nn.Embedding (class labels, tokens). Ghost form: sample i's gradient is a scatter of its G rows, so
``||grad_i||^2 = sum_{t,s} [idx_t == idx_s] (g_t . g_s)`` over its K*T positions."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _norms
from .base import Rule, Target, scale_rows
from ..errors import UnsupportedModuleError


class _EmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, weight, tape, site, padding_idx):
        ctx.tape, ctx.site = tape, site
        site.saved["idx"] = idx
        return F.embedding(idx, weight, padding_idx)

    @staticmethod
    def backward(ctx, G):
        ctx.tape.record_grad(ctx.site, G)
        return None, None, None, None, None


class EmbeddingRule(Rule):
    types = (nn.Embedding,)

    def check(self, module, name):
        for attr, why in (("max_norm", "renormalises the weight inside forward"),
                          ("scale_grad_by_freq", "scales gradients by batch-wide token counts"),
                          ("sparse", "produces sparse gradients")):
            if getattr(module, attr):
                raise UnsupportedModuleError(
                    f"module {name!r}: nn.Embedding with {attr}={getattr(module, attr)!r} {why}, which "
                    f"per-sample clipping cannot account for; construct it without {attr}")

    def forward(self, tape, module, name, orig, idx):
        if not module.weight.requires_grad:
            return orig(idx)
        if idx.dim() < 1:
            raise ValueError(f"module {name!r}: a private Embedding needs batched indices, got a scalar")
        site = tape.new_site(self, name, [Target(module.weight)], rows=idx.shape[0],
                             padding_idx=module.padding_idx)
        return _EmbeddingFn.apply(idx, module.weight, tape, site, module.padding_idx)

    @staticmethod
    def _flat(site):
        idx, G = site.saved["idx"], site.G
        R = idx.shape[0]
        idx2 = idx.reshape(R, -1)
        G3 = G.reshape(R, idx2.shape[1], G.shape[-1])
        pad = site.saved["padding_idx"]
        if pad is not None:
            G3 = G3 * (idx2 != pad).unsqueeze(-1).to(G3.dtype)
        return idx2, G3

    def norm_sq(self, site, tape):
        K = tape.multiplicity
        idx2, G3 = self._flat(site)
        I = _norms.group_rows(idx2.unsqueeze(-1), K).squeeze(-1)
        # fp64: the masked Gram double sum cancels like the linear ghost norm's (see _norms.ghost_norm_sq)
        Gg = _norms.group_rows(G3, K).double()
        B, T = I.shape
        out = torch.empty(B, dtype=Gg.dtype, device=Gg.device)
        step = max(1, _norms.get_memory_budget() // max(1, 2 * T * T))
        for start in range(0, B, step):
            sl = slice(start, min(B, start + step))
            same = (I[sl].unsqueeze(2) == I[sl].unsqueeze(1)).to(Gg.dtype)
            out[sl] = (same * torch.bmm(Gg[sl], Gg[sl].transpose(1, 2))).sum(dim=(1, 2))
        return out.to(_norms._acc_dtype(G3))

    def per_sample_grads(self, site, tape, sl):
        K = tape.multiplicity
        idx2, G3 = self._flat(site)
        I = _norms.group_rows(idx2.unsqueeze(-1), K).squeeze(-1)[sl]
        Gg = _norms.to_acc(_norms.group_rows(G3, K))[sl]
        b, T, D = Gg.shape
        V = site.targets[0].param.shape[0]
        out = torch.zeros(b, V, D, dtype=Gg.dtype, device=Gg.device)
        out.scatter_add_(1, I.unsqueeze(-1).expand(b, T, D), Gg)
        return [out]

    def clipped_grads(self, site, tape, s):
        idx2, G3 = self._flat(site)
        Gs = scale_rows(G3, s)
        W = site.targets[0].param
        out = torch.zeros(W.shape, dtype=_norms.to_acc(Gs).dtype, device=Gs.device)
        out.index_add_(0, idx2.reshape(-1), _norms.to_acc(Gs).reshape(-1, Gs.shape[-1]))
        return [out]
