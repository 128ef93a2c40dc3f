"""Direct per-sample norm of a Conv2d weight gradient by implicit GEMM.

Per group g the weight gradient of sample i is (Cout/groups, Cin/groups*kh*kw) =
sum over its K rows and Ho*Wo output positions of g_pos x_patch(pos)^T.  The patch column for
(c_in, ki, kj) is gathered from x on the fly with stride/padding/dilation (zero outside), so the
9x-larger unfold(x) of a 3x3 conv is never materialised; the gradient tile lives only in registers.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .linear_norm import (_check_inputs, _dot_precision, _interpretable, _min_block, _n_tiles,
                          _prune_blocks, _tuning)

_CONV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_CO": bc, "BLOCK_J": bj}, num_warps=w, num_stages=s)
    for bn, bc, bj, w, s in [
        (32, 32, 32, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 3), (32, 128, 64, 4, 3),
        (32, 64, 128, 4, 3), (32, 128, 128, 8, 3), (64, 128, 128, 8, 3),
    ]
]


@triton.autotune(
    configs=_tuning(_CONV_CONFIGS, BLOCK_N=16, BLOCK_CO=16, BLOCK_J=16),
    key=["n_red", "cout_g", "J"],  # not the batch: it changes every step under Poisson sampling
    prune_configs_by={"early_config_prune": _prune_blocks(BLOCK_CO="cout_g", BLOCK_J="J")},
)
@triton.jit
def _conv2d_direct_norm_kernel(
    X, G, part, n_red, L, Wo, H, W, K, groups, cin_g, cout_g, J, n_slots,
    s_xr, s_xc, s_xh, s_xw, s_gr, s_gc, s_gh, s_gw,
    # Geometry is compile-time: a U-Net has a handful of distinct convs, and constant KW, SH...
    # turn the per-element patch index arithmetic into shifts and multiply-adds.
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, CIN_INNER: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_J: tl.constexpr,
):
    # One program = one (sample, group, cout-tile, patch-column tile) of the gradient.
    i = tl.program_id(0) // groups
    grp = tl.program_id(0) % groups
    pid_co = tl.program_id(1)
    pid_j = tl.program_id(2)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    # Patch column j -> (c_in, ki, kj).  The norm does not depend on the column order, so pick the
    # one that makes neighbouring j neighbours in memory: channel-innermost for channels_last x,
    # unfold's channel-major order otherwise.
    if CIN_INNER:
        ci = offs_j % cin_g
        ki = (offs_j // cin_g) // KW
        kj = (offs_j // cin_g) % KW
    else:
        ci = offs_j // (KH * KW)
        ki = (offs_j % (KH * KW)) // KW
        kj = offs_j % KW
    c_in = grp * cin_g + ci
    c_out = grp * cout_g + offs_co
    in_co, in_j = offs_co < cout_g, offs_j < J
    acc = tl.zeros((BLOCK_CO, BLOCK_J), dtype=tl.float32)
    for r0 in range(0, n_red, BLOCK_N):
        # Reduction index r: output position r % L of row i*K + r // L.
        r = r0 + tl.arange(0, BLOCK_N)
        in_r = r < n_red
        row = (i * K + r // L).to(tl.int64)
        pos = r % L
        oh, ow = pos // Wo, pos % Wo
        g = tl.load(G + row[None, :] * s_gr + c_out[:, None] * s_gc + oh[None, :] * s_gh
                    + ow[None, :] * s_gw, mask=in_co[:, None] & in_r[None, :], other=0.0)
        ih = oh[:, None] * SH - PH + ki[None, :] * DH
        iw = ow[:, None] * SW - PW + kj[None, :] * DW
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)  # zero padding
        x = tl.load(X + row[:, None] * s_xr + c_in[None, :] * s_xc + ih * s_xh + iw * s_xw,
                    mask=in_r[:, None] & in_j[None, :] & inside, other=0.0)
        acc = tl.dot(g, x, acc, input_precision=PRECISION)
    sq = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
    n_tiles = tl.num_programs(1) * tl.num_programs(2)
    tl.store(part + i * n_slots + grp * n_tiles + pid_co * tl.num_programs(2) + pid_j, sq)


def _pair(v, name):
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, str):  # the engine resolves "same"/"valid"; the kernel needs numbers
        raise ValueError(f"{name} must be an int or a pair of ints; resolve {v!r} to ints first")
    if len(v) != 2 or not all(isinstance(e, int) for e in v):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return tuple(v)


def conv2d_direct_norm(x: torch.Tensor, G: torch.Tensor, kernel_size, K: int = 1, stride=(1, 1),
                       padding=(0, 0), dilation=(1, 1), groups: int = 1, *,
                       allow_tf32: bool = False) -> torch.Tensor:
    """Per-sample ||grad_W||_F^2 of a Conv2d, fp32 (R//K,).

    x: (R, Cin, H, W) layer input (any strides: contiguous or channels_last), G: (R, Cout, Ho, Wo)
    output gradient, R = B*K rows sample-major (sample i's gradient sums its K rows).
    kernel_size, stride, padding, dilation: int or pair of ints.
    """
    (kh, kw), (sh, sw) = _pair(kernel_size, "kernel_size"), _pair(stride, "stride")
    (ph, pw), (dh, dw) = _pair(padding, "padding"), _pair(dilation, "dilation")
    if x.dim() != 4:
        raise ValueError(f"x must be (R, Cin, H, W), got shape {tuple(x.shape)}")
    R, Cin, H, W = x.shape
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if G.dim() != 4 or G.shape[0] != R or G.shape[2:] != (Ho, Wo):
        raise ValueError(f"G must be (R, Cout, Ho, Wo) = ({R}, Cout, {Ho}, {Wo}) for this conv, "
                         f"got shape {tuple(G.shape)}")
    Cout = G.shape[1]
    if groups < 1 or Cin % groups or Cout % groups:
        raise ValueError(f"groups={groups} must divide Cin={Cin} (x.shape[1]) and "
                         f"Cout={Cout} (G.shape[1])")
    R, B = _check_inputs(K, x=x, G=G)
    cin_g, cout_g = Cin // groups, Cout // groups
    J, L = cin_g * kh * kw, Ho * Wo
    if B == 0 or J * cout_g * L == 0:
        return torch.zeros(B, device=x.device, dtype=torch.float32)
    kernel = _conv2d_direct_norm_kernel
    # Per-tile partials reduced by torch.sum: deterministic, unlike atomics (see linear_norm).
    n_slots = groups * (triton.cdiv(cout_g, _min_block(kernel, "BLOCK_CO"))
                        * triton.cdiv(J, _min_block(kernel, "BLOCK_J")))
    part = torch.empty((B, n_slots), device=x.device, dtype=torch.float32)
    grid = lambda meta: (B * groups, triton.cdiv(cout_g, meta["BLOCK_CO"]), triton.cdiv(J, meta["BLOCK_J"]))  # noqa: E731
    precision = _dot_precision(x.dtype, allow_tf32)
    x, G = _interpretable(x, G)
    kernel[grid](x, G, part, K * L, L, Wo, H, W, K, groups, cin_g, cout_g, J, n_slots,
                 *x.stride(), *G.stride(), KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw,
                 CIN_INNER=x.stride(1) == 1 and Cin > 1, PRECISION=precision)
    used = groups * _n_tiles(kernel, (cout_g, "BLOCK_CO"), (J, "BLOCK_J"))
    return part[:, :used].sum(1)


def conv2d_direct_norm_ref(x: torch.Tensor, G: torch.Tensor, kernel_size, K: int = 1,
                           stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                           groups: int = 1) -> torch.Tensor:
    """The spec, through an explicit unfold: per group, M = sum_l G[:, l] cols[:, l]^T over the
    sample's K*Ho*Wo positions; ||M||_F^2 summed over groups.  fp32 (fp64 for fp64 inputs)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    R, Cout = x.shape[0], G.shape[1]
    cols = F.unfold(x.to(acc), kernel_size, dilation=dilation, padding=padding, stride=stride)
    L = cols.shape[-1]
    cols = cols.reshape(R // K, K, groups, -1, L)  # unfold is channel-major: groups split cleanly
    Gm = G.to(acc).reshape(R // K, K, groups, Cout // groups, L)
    return torch.einsum("bkgjl,bkgcl->bgcj", cols, Gm).square().sum((1, 2, 3))
