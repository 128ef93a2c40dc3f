"""nn.MultiheadAttention: its forward uses ``in_proj_weight`` and ``out_proj.weight`` directly, so the
rule re-implements the forward with private projections. The packed ``in_proj_weight`` gets one site
for self-attention (q = k = v) and one site per row block (q, k, v) otherwise: the blocks are disjoint
coordinates, so their squared norms add."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Rule, Target, trainable
from .linear import LinearRule, dp_linear
from ..errors import UnsupportedModuleError

_LINEAR = LinearRule()


def _t(p, rows=None):
    return Target(p, rows) if trainable(p) else None


def _as_additive(mask, dtype):
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class MultiheadAttentionRule(Rule):
    types = (nn.MultiheadAttention,)
    composite = True

    def check(self, module, name):
        if module.bias_k is not None:
            raise UnsupportedModuleError(
                f"module {name!r}: nn.MultiheadAttention(add_bias_kv=True) has no per-sample rule yet; "
                "construct it with add_bias_kv=False")

    def forward(self, tape, m, name, orig, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if query.dim() != 3:
            raise ValueError(f"module {name!r}: private MultiheadAttention needs batched 3-D inputs, "
                             f"got query of shape {tuple(query.shape)}")
        same = query is key and key is value
        if not m.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        E, H = m.embed_dim, m.num_heads
        b_in = m.in_proj_bias
        blocks = [slice(0, E), slice(E, 2 * E), slice(2 * E, 3 * E)]
        if m._qkv_same_embed_dim and same:
            qkv = dp_linear(tape, _LINEAR, name + ".in_proj", query, m.in_proj_weight, b_in,
                            _t(m.in_proj_weight), _t(b_in))
            q, k, v = qkv.chunk(3, dim=-1)
        else:
            if m._qkv_same_embed_dim:
                ws = [(m.in_proj_weight[sl], _t(m.in_proj_weight, sl)) for sl in blocks]
            else:
                ws = [(w, _t(w)) for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)]
            outs = []
            for x, (w, wt), sl, part in zip((query, key, value), ws, blocks, "qkv"):
                bias = b_in[sl] if b_in is not None else None
                outs.append(dp_linear(tape, _LINEAR, f"{name}.in_proj.{part}", x, w, bias, wt,
                                      _t(b_in, sl) if b_in is not None else None))
            q, k, v = outs
        N, L, _ = q.shape
        if m.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, 1, E)], dim=1)
            v = torch.cat([v, v.new_zeros(N, 1, E)], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        S = k.shape[1]
        hd = E // H
        q, k, v = (t.reshape(N, -1, H, hd).transpose(1, 2) for t in (q, k, v))
        mask = _as_additive(attn_mask, q.dtype)
        if mask is not None:
            mask = mask.view(N, H, L, S) if mask.dim() == 3 else mask.view(1, 1, L, S)
        elif is_causal:
            mask = torch.full((L, S), float("-inf"), dtype=q.dtype, device=q.device).triu(1).view(1, 1, L, S)
        kpm = _as_additive(key_padding_mask, q.dtype)
        if kpm is not None:
            kpm = kpm.view(N, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        p_drop = m.dropout if m.training else 0.0
        weights = None
        if need_weights:
            scores = q.matmul(k.transpose(-2, -1)) / math.sqrt(hd)
            if mask is not None:
                scores = scores + mask
            attn = scores.softmax(dim=-1)
            out = F.dropout(attn, p_drop, training=p_drop > 0).matmul(v)
            weights = attn.mean(dim=1) if average_attn_weights else attn
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        out = out.transpose(1, 2).reshape(N, L, E)
        op = m.out_proj
        out = dp_linear(tape, _LINEAR, name + ".out_proj", out, op.weight, op.bias, _t(op.weight), _t(op.bias))
        if not m.batch_first:
            out = out.transpose(0, 1)
        return out, weights
