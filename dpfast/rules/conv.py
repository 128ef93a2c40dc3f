"""Conv1d / Conv2d / ConvTranspose1d / ConvTranspose2d, any stride, padding (incl. "same"),
dilation, groups, padding mode and memory format (channels_last included).

Weight gradient of sample i, group g: ``sum_pos g_pos u_pos^T`` where ``u_pos`` is the im2col patch of
the input at output position ``pos`` (for a transposed conv the roles swap: the patch is taken from
the output gradient and the "gradient" side is the input). The torch reference below unfolds a chunk
of samples at a time; the Triton kernel (kernels/conv_norm.py) gathers patches on the fly instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _norms
from .backends import (conv2d_clipped_wgrad, conv2d_kernel_applies, conv2d_per_sample_grads,
                       conv2d_weight_norm_sq)
from .base import Rule, Target, autocast_cast, scale_rows, trainable

_conv_bwd = torch.ops.aten.convolution_backward.default


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, tape, site, cfg):
        ctx.tape, ctx.site, ctx.cfg = tape, site, cfg
        ctx.save_for_backward(weight)
        site.saved["x"] = x.detach()
        stride, padding, dilation, transposed, output_padding, groups = cfg
        return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, transposed,
                                          output_padding, groups)

    @staticmethod
    def backward(ctx, G):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, transposed, output_padding, groups = ctx.cfg
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _conv_bwd(G, ctx.site.saved["x"], weight, None, stride, padding, dilation, transposed,
                               output_padding, groups, [True, False, False])[0]
        ctx.tape.record_grad(ctx.site, G)
        return grad_x, None, None, None, None, None


def _resolve_padding(module, x):
    """Turn "same"/"valid"/padding modes into explicit symmetric padding (padding x if needed)."""
    nd = len(module.kernel_size)
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        return x, (0,) * nd
    if module.padding == "valid":
        return x, (0,) * nd
    if module.padding == "same":
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        left = [t // 2 for t in total]
        if all(2 * l == t for l, t in zip(left, total)):
            return x, tuple(left)
        pads = []
        for t, l in zip(reversed(total), reversed(left)):  # F.pad wants the last dim first
            pads += [l, t - l]
        return F.pad(x, pads), (0,) * nd
    return x, tuple(module.padding)


class ConvRule(Rule):
    types = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)

    def forward(self, tape, module, name, orig, x, output_size=None):
        w = Target(module.weight) if trainable(module.weight) else None
        b = Target(module.bias) if trainable(module.bias) else None
        if w is None and b is None:
            return orig(x) if output_size is None else orig(x, output_size)
        nd = len(module.kernel_size)
        if x.dim() != nd + 2:
            raise ValueError(f"module {name!r}: a private {type(module).__name__} needs a batched "
                             f"{nd + 2}-D input (rows first), got shape {tuple(x.shape)}")
        if module.transposed:
            output_padding = tuple(module._output_padding(
                x, output_size, module.stride, module.padding, module.kernel_size, nd, module.dilation))
            padding = tuple(module.padding)
        else:
            output_padding = (0,) * nd
            x, padding = _resolve_padding(module, x)
        (x, weight, bias), ctx = autocast_cast(x.device.type, x, module.weight, module.bias)
        cfg = (tuple(module.stride), padding, tuple(module.dilation), module.transposed, output_padding,
               module.groups)
        site = tape.new_site(self, name, [t for t in (w, b) if t is not None], rows=x.shape[0],
                             has_w=w is not None, has_b=b is not None, cfg=cfg, weight=weight,
                             kernel_size=tuple(module.kernel_size))
        with ctx:
            return _ConvFn.apply(x, weight, bias, tape, site, cfg)

    # ------------------------------------------------------------------ maths
    @staticmethod
    def _layout(site):
        """The unfold view: (source to unfold, other side, 2-D conv params, d_g, p_g, groups)."""
        x, G, weight = site.saved["x"], site.G, site.saved["weight"]
        stride, padding, dilation, transposed, _, groups = site.saved["cfg"]
        k = site.saved["kernel_size"]
        if len(k) == 1:  # conv1d as a conv2d of height 1
            x, G = x.unsqueeze(2), G.unsqueeze(2)
            k, stride, padding, dilation = (1, *k), (1, *stride), (0, *padding), (1, *dilation)
        # weight (Cout, Cin/g, kh, kw), or (Cin, Cout/g, kh, kw) when transposed: either way dim 1 times
        # the kernel area is the patch length d_g, and dim 0 / groups the other side p_g
        d_g, p_g = weight.shape[1] * k[0] * k[1], weight.shape[0] // groups
        src, other = (G, x) if transposed else (x, G)
        return src, other, (k, stride, padding, dilation), d_g, p_g, groups

    def _unfolded(self, site, tape, rows: slice):
        """(b*groups, K*L, d_g) patches and (b*groups, K*L, p_g) partners for the samples of ``rows``."""
        src, other, (k, stride, padding, dilation), d_g, p_g, groups = self._layout(site)
        K = tape.multiplicity
        U = F.unfold(src[rows], k, dilation=dilation, padding=padding, stride=stride)
        r, L = U.shape[0], U.shape[-1]
        b = r // K
        U = U.reshape(b, K, groups, d_g, L).permute(0, 2, 1, 4, 3).reshape(b * groups, K * L, d_g)
        O = other[rows].reshape(b, K, groups, p_g, L).permute(0, 2, 1, 4, 3).reshape(b * groups, K * L, p_g)
        return U, O, b, groups

    def _sample_chunks(self, site, tape):
        src, other, _, d_g, p_g, groups = self._layout(site)
        K = tape.multiplicity
        L = other[0, 0].numel()
        per_sample = K * groups * (d_g + p_g) * L
        step = max(1, _norms.get_memory_budget() // max(1, per_sample))
        B = src.shape[0] // K
        for start in range(0, B, step):
            stop = min(B, start + step)
            yield slice(start, stop), slice(start * K, stop * K)

    def norm_shape(self, site, tape) -> tuple[int, int, int]:
        """(T, d, p) of one group's weight-gradient norm per sample: K x output positions, patch
        length, output channels per group."""
        _, other, _, d_g, p_g, _ = self._layout(site)
        return tape.multiplicity * other[0, 0].numel(), d_g, p_g

    def norm_sq(self, site, tape):
        K = tape.multiplicity
        G = site.G
        out = torch.zeros(G.shape[0] // K, dtype=torch.float64 if G.dtype == torch.float64 else torch.float32,
                          device=G.device)
        if site.saved["has_w"]:
            stride, padding, dilation, transposed, _, groups = site.saved["cfg"]
            src, other, _, d_g, p_g, _ = self._layout(site)
            T = K * other[0, 0].numel()
            x, ks = site.saved["x"], site.saved["kernel_size"]
            kernel = conv2d_kernel_applies(x, transposed, ks, tape.backend)
            method = tape.method_of(site)
            if method == "auto":
                method = "ghost" if _norms.prefer_ghost(T, d_g, p_g, x.dtype if kernel else None) else "direct"
            fast = None
            if kernel:
                fast = conv2d_weight_norm_sq(x, G, ks, K, stride, padding, dilation, groups, method)
            if fast is not None:
                out += fast.to(out.dtype)
            elif method == "direct":
                for samples, grads in self._per_sample_weight_grads(site, tape):
                    out[samples] += grads.flatten(1).square().sum(dim=1)
            else:
                for samples, rows in self._sample_chunks(site, tape):
                    U, O, b, g = self._unfolded(site, tape, rows)
                    out[samples] += _norms.linear_norm_sq(U, O, method).reshape(b, g).sum(dim=1)
        if site.saved["has_b"]:
            out += _norms.per_sample_sum_sq(_norms.to_acc(G).flatten(2).sum(dim=2), K)
        return out

    def psg_variants(self, site, tape) -> tuple:
        """The ways :meth:`per_sample_grads` can form a sample's weight gradient; :mod:`dpfast.plan`
        times each and keeps the fastest (``site.variant``). Both are the batch-as-groups trick:

        * ``rows``: every row is a group (a ``(1, rows x C, H, W)`` view, no copy), giving each
          row's gradient; a sample's K rows are then summed. Best at high resolution.
        * ``samples``: every sample is a group and its K rows are the convolution's batch, which the
          library sums over: the K-row sum comes out of the call. It copies the layer's input and
          output gradient to ``(K, samples x C, H, W)`` but forms K times less output: up to 4x
          faster at low resolution or large K. With K = 1 the two are the same call.
        * ``each`` (K > 1): one ungrouped weight-gradient call per sample, its K rows the batch. B
          calls instead of one, but each is the library's common case: up to 2x faster than either
          grouped form on some 28x28 layers at K = 4 (measured in the step: DPDM's U-Net).
        * ``triton``: on the triton backend, the direct norm's implicit-GEMM kernel writing each
          (sample, group) tile instead of squaring and discarding it (kernels/conv_norm.py); no
          copy, and no convolution of B x groups groups, which GPU libraries run slowly."""
        kernel = conv2d_kernel_applies(site.saved["x"], site.saved["cfg"][3], site.saved["kernel_size"],
                                       tape.backend)
        if self._pointwise(site):
            return ("rows", "triton") if kernel else ("rows",)
        base = ("rows",) if tape.multiplicity == 1 else ("rows", "samples", "each")
        return base + ("triton",) if kernel else base

    @staticmethod
    def _pointwise(site) -> bool:
        stride, padding, dilation, transposed, output_padding, groups = site.saved["cfg"]
        return (not transposed and groups == 1 and all(k == 1 for k in site.saved["kernel_size"])
                and all(v == 1 for v in stride) and all(v == 0 for v in padding))

    def _per_sample_weight_grads(self, site, tape, samples: slice | None = None):
        """Yield (sample slice, (b, *weight.shape) per-sample weight gradients) chunk by chunk, in the
        way ``site.variant`` names (:meth:`psg_variants`; ``rows`` when unset). It runs in the
        convolution library (no unfold), at about the cost of the layer's weight gradient."""
        x, G, weight = site.saved["x"], site.G, site.saved["weight"]
        stride, padding, dilation, transposed, output_padding, groups = site.saved["cfg"]
        K = tape.multiplicity
        B = G.shape[0] // K
        samples = samples or slice(0, B)
        by_sample = K > 1 and site.variant == "samples" and not self._pointwise(site)
        # what one sample holds at once: K row gradients, or its copied rows and one gradient
        per_sample = weight.numel() + K * (x[0].numel() + G[0].numel()) if by_sample else K * weight.numel()
        step = max(1, _norms.get_memory_budget() // max(1, per_sample))
        acc = torch.float64 if G.dtype == torch.float64 else torch.float32
        pointwise = self._pointwise(site)
        if site.variant == "triton":  # one launch: its output is the gradients asked for (fp32), no scratch
            rows = slice(samples.start * K, samples.stop * K)
            yield (slice(0, samples.stop - samples.start),
                   conv2d_per_sample_grads(x[rows], G[rows], site.saved["kernel_size"], K, stride, padding,
                                           dilation, groups))
            return
        if site.variant == "each" and K > 1 and not pointwise:
            w = weight.to(acc)
            out = w.new_empty((samples.stop - samples.start, *w.shape))  # filled in place: one sample's scratch
            for j, i in enumerate(range(samples.start, samples.stop)):
                out[j] = _conv_bwd(G[i * K:(i + 1) * K].to(acc), x[i * K:(i + 1) * K].to(acc), w, None, stride,
                                   padding, dilation, transposed, output_padding, groups, [False, True, False])[1]
            yield slice(0, samples.stop - samples.start), out
            return
        for start in range(samples.start, samples.stop, step):
            stop = min(samples.stop, start + step)
            b, r = stop - start, (stop - start) * K
            # in fp32: per-sample gradients rounded to bf16 would give norms (and clip factors) off by 2^-9
            xs, Gs = x[start * K:stop * K].to(acc), G[start * K:stop * K].to(acc)
            out = slice(start - samples.start, stop - samples.start)
            if pointwise:  # a 1x1 conv is a linear map per position: one batched matmul over positions
                gw = torch.bmm(Gs.reshape(b, K, Gs.shape[1], -1).transpose(1, 2).reshape(b, Gs.shape[1], -1),
                               xs.reshape(b, K, xs.shape[1], -1).transpose(1, 2).reshape(b, xs.shape[1], -1)
                               .transpose(1, 2))
                yield out, gw.view(b, *weight.shape)
                continue
            if by_sample:  # (K, b x C, H, W): group i is sample i, the batch dim its K rows
                Gs = Gs.reshape(b, K, *Gs.shape[1:]).transpose(0, 1).reshape(K, -1, *Gs.shape[2:])
                xs = xs.reshape(b, K, *xs.shape[1:]).transpose(0, 1).reshape(K, -1, *xs.shape[2:])
                n_groups = b * groups
            else:
                Gs, xs = Gs.reshape(1, -1, *Gs.shape[2:]), xs.reshape(1, -1, *xs.shape[2:])
                n_groups = r * groups
            shape = (n_groups // groups * weight.shape[0], *weight.shape[1:])
            gw = _conv_bwd(Gs, xs, xs.new_empty(1).expand(shape), None, stride, padding, dilation, transposed,
                           output_padding, n_groups, [False, True, False])[1].to(acc)
            if by_sample or K == 1:  # (a sum over one row would be a slow copy)
                yield out, gw.view(b, *weight.shape)
            else:
                yield out, gw.reshape(b, K, *weight.shape).sum(dim=1)

    def per_sample_grads(self, site, tape, sl):
        K = tape.multiplicity
        rows = slice(sl.start * K, sl.stop * K)
        out = []
        if site.saved["has_w"]:
            parts = [g for _, g in self._per_sample_weight_grads(site, tape, sl)]
            out.append(torch.cat(parts) if len(parts) > 1 else parts[0])
        if site.saved["has_b"]:
            Gb = _norms.to_acc(site.G[rows]).flatten(2).sum(dim=2)
            out.append(Gb.reshape(-1, K, Gb.shape[-1]).sum(dim=1))
        return out

    def clipped_grads(self, site, tape, s):
        x, G, weight = site.saved["x"], site.G, site.saved["weight"]
        stride, padding, dilation, transposed, output_padding, groups = site.saved["cfg"]
        has_w, has_b = site.saved["has_w"], site.saved["has_b"]
        if has_w and not transposed:  # bf16/fp16 on the triton backend: fused, exact products
            fused = conv2d_clipped_wgrad(x, G, s, tape.multiplicity, site.saved["kernel_size"], stride,
                                         padding, dilation, groups, tape.backend)
            if fused is not None:
                if not has_b:
                    return [fused]
                gb = G.flatten(2).sum(dim=2, dtype=torch.float32)
                return [fused, (gb * s.to(gb.dtype).view(-1, 1)).sum(dim=0)]
        Gs = scale_rows(G, s)  # fp32: the sum is never rounded to bf16/fp16 (see scale_rows)
        w_like = Gs.new_empty(()).expand(weight.shape)  # the call reads only its shape and dtype
        _, gw, gb = _conv_bwd(Gs, x.to(Gs.dtype), w_like, [G.shape[1]] if has_b else None, stride, padding,
                              dilation, transposed, output_padding, groups, [False, has_w, has_b])
        return [g for g, want in ((gw, has_w), (gb, has_b)) if want]
