"""Per-sample norms of a Conv2d weight gradient by implicit GEMM: direct and ghost; and the
per-sample weight gradients themselves, for the engine's materialize strategy.

Per group g the weight gradient of sample i is (Cout/groups, Cin/groups*kh*kw) =
sum over its K rows and Ho*Wo output positions of g_pos x_patch(pos)^T.  The patch column for
(c_in, ki, kj) is gathered from x on the fly with stride/padding/dilation (zero outside), so the
9x-larger unfold(x) of a 3x3 conv is never materialised; the gradient tile lives only in registers.
The ghost kernel gathers the same patches to form the position Gram matrices tile by tile instead.
The per-sample-gradient kernel forms the same tiles as the direct norm and writes them out instead
of squaring and discarding them: one implicit GEMM per (sample, group) instead of a library
convolution of B x groups groups.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .linear_norm import (_check_inputs, _dot_precision, _interpretable, _min_block, _n_tiles,
                          TuningSpace)

# 64-row tiles take 8 warps: with 4 (or 64x128x128 with 8) the gathered NCHW patch indices need
# over 255 registers and spill on sm_90 (`dpfast check-kernels`).
CONV_SPACE = TuningSpace(
    ("BLOCK_N", "BLOCK_CO", "BLOCK_J"),
    tensor_core=[(32, 32, 32, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 8, 3), (32, 128, 128, 8, 3),
                 (64, 128, 64, 8, 3)],
    fma=[(32, 32, 32, 8, 3), (32, 64, 64, 4, 4), (32, 128, 128, 8, 3)],
    interp=(16, 16, 16))


@triton.jit
def _patch_columns(offs_j, cin_g, KH: tl.constexpr, KW: tl.constexpr, CIN_INNER: tl.constexpr):
    """Patch column j -> (c_in within the group, ki, kj).  The norm does not depend on the column
    order, so pick the one that makes neighbouring j neighbours in memory: channel-innermost for
    channels_last x, unfold's channel-major order otherwise."""
    if CIN_INNER:
        ci = offs_j % cin_g
        ki = (offs_j // cin_g) // KW
        kj = (offs_j // cin_g) % KW
    else:
        ci = offs_j // (KH * KW)
        ki = (offs_j % (KH * KW)) // KW
        kj = offs_j % KW
    return ci, ki, kj


@triton.jit
def _load_patches(X, row, oh, ow, in_r, c_in, ki, kj, in_j, H, W, s_xr, s_xc, s_xh, s_xw,
                  SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                  DH: tl.constexpr, DW: tl.constexpr):
    """(positions, columns) tile of unfold(x): x[row, c_in, oh*SH-PH+ki*DH, ow*SW-PW+kj*DW],
    zero outside the image (padding) and outside the masks."""
    ih = oh[:, None] * SH - PH + ki[None, :] * DH
    iw = ow[:, None] * SW - PW + kj[None, :] * DW
    inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return tl.load(X + row[:, None] * s_xr + c_in[None, :] * s_xc + ih * s_xh + iw * s_xw,
                   mask=in_r[:, None] & in_j[None, :] & inside, other=0.0)


@triton.jit
def _sample_conv_grad(X, G, i, K, n_red, L, Wo, H, W, c_out, in_co, c_in, ki, kj, in_j,
                      s_xr, s_xc, s_xh, s_xw, s_gr, s_gc, s_gh, s_gw,
                      SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                      DH: tl.constexpr, DW: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_J: tl.constexpr):
    """The (cout-tile, patch-column tile) of sample i's weight gradient, fp32: sum over its K rows'
    L output positions (n_red = K*L) of g_pos x_patch(pos)^T.  Shared by the norm and the
    clipped-gradient kernels."""
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
        x = _load_patches(X, row, oh, ow, in_r, c_in, ki, kj, in_j, H, W, s_xr, s_xc, s_xh, s_xw,
                          SH, SW, PH, PW, DH, DW)
        acc = tl.dot(g, x, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _program_tile(X, G, n_red, L, Wo, H, W, K, groups, cin_g, cout_g, J, s_xr, s_xc, s_xh, s_xw, s_gr, s_gc,
                  s_gh, s_gw, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                  PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                  CIN_INNER: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_CO: tl.constexpr, BLOCK_J: tl.constexpr):
    """The tile of this program (sample, group, cout-tile, patch-column tile) of the per-sample
    gradient, and where it sits: (acc, i, grp, c_out, ci, ki, kj, in_co, in_j)."""
    i = tl.program_id(0) // groups
    grp = tl.program_id(0) % groups
    offs_co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    ci, ki, kj = _patch_columns(offs_j, cin_g, KH, KW, CIN_INNER)
    c_in = grp * cin_g + ci
    c_out = grp * cout_g + offs_co
    in_co, in_j = offs_co < cout_g, offs_j < J
    acc = _sample_conv_grad(X, G, i, K, n_red, L, Wo, H, W, c_out, in_co, c_in, ki, kj, in_j,
                            s_xr, s_xc, s_xh, s_xw, s_gr, s_gc, s_gh, s_gw, SH, SW, PH, PW, DH, DW,
                            PRECISION, BLOCK_N, BLOCK_CO, BLOCK_J)
    return acc, i, grp, c_out, ci, ki, kj, in_co, in_j


@triton.autotune(
    configs=CONV_SPACE.configs,
    # not the batch: it changes every step under Poisson sampling
    key=["n_red", "cout_g", "J", "KH", "KW", "SH", "SW", "CIN_INNER", "PRECISION"],
    prune_configs_by={"early_config_prune": CONV_SPACE.prune(BLOCK_CO="cout_g", BLOCK_J="J")},
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
    acc, i, grp, _, _, _, _, _, _ = _program_tile(
        X, G, n_red, L, Wo, H, W, K, groups, cin_g, cout_g, J, s_xr, s_xc, s_xh, s_xw, s_gr, s_gc, s_gh,
        s_gw, KH, KW, SH, SW, PH, PW, DH, DW, CIN_INNER, PRECISION, BLOCK_N, BLOCK_CO, BLOCK_J)
    sq = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
    n_tiles = tl.num_programs(1) * tl.num_programs(2)
    tl.store(part + i.to(tl.int64) * n_slots + grp * n_tiles + tl.program_id(1) * tl.num_programs(2)
             + tl.program_id(2), sq)


@triton.autotune(
    configs=CONV_SPACE.configs,
    key=["n_red", "cout_g", "J", "KH", "KW", "SH", "SW", "CIN_INNER", "PRECISION"],
    prune_configs_by={"early_config_prune": CONV_SPACE.prune(BLOCK_CO="cout_g", BLOCK_J="J")},
)
@triton.jit
def _conv2d_per_sample_grads_kernel(
    X, G, OUT, n_red, L, Wo, H, W, K, groups, cin_g, cout_g, J,
    s_xr, s_xc, s_xh, s_xw, s_gr, s_gc, s_gh, s_gw, s_oi,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, CIN_INNER: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_J: tl.constexpr,
):
    # The direct norm's program, storing its tile: OUT is (B, Cout, J) contiguous, row c_out of
    # sample i's weight gradient in the weight's own (Cin/groups, kh, kw) order whatever order the
    # patch columns were gathered in.
    acc, i, _, c_out, ci, ki, kj, in_co, in_j = _program_tile(
        X, G, n_red, L, Wo, H, W, K, groups, cin_g, cout_g, J, s_xr, s_xc, s_xh, s_xw, s_gr, s_gc, s_gh,
        s_gw, KH, KW, SH, SW, PH, PW, DH, DW, CIN_INNER, PRECISION, BLOCK_N, BLOCK_CO, BLOCK_J)
    j_out = ci * (KH * KW) + ki * KW + kj
    tl.store(OUT + i.to(tl.int64) * s_oi + c_out[:, None] * J + j_out[None, :], acc,
             mask=in_co[:, None] & in_j[None, :])


# Two gathered patch tiles per step are register-hungry: only these tiles compile without spills
# for NCHW and NHWC inputs in bf16, tf32 and fp32 on sm_90 (`dpfast check-kernels`); 64-row tiles
# run on wgmma, 32-row ones on mma.sync.
CONV_GHOST_SPACE = TuningSpace(("BLOCK_T", "BLOCK_F"), tensor_core=[(32, 32, 8, 2), (64, 32, 8, 3)],
                               fma=[(32, 32, 8, 2), (64, 32, 8, 3)], interp=(16, 16))


@triton.autotune(
    configs=CONV_GHOST_SPACE.configs,
    key=["n_red", "cout_g", "J", "KH", "KW", "SH", "SW", "CIN_INNER", "PRECISION"],
    prune_configs_by={"early_config_prune": CONV_GHOST_SPACE.prune(BLOCK_T="n_red",
                                                                   BLOCK_F=("cout_g", "J"))},
)
@triton.jit
def _conv2d_ghost_norm_kernel(
    X, G, part, n_red, L, Wo, H, W, K, groups, cin_g, cout_g, J, n_slots,
    s_xr, s_xc, s_xh, s_xw, s_gr, s_gc, s_gh, s_gw,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, CIN_INNER: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
):
    # One program = one (t, s) tile of the (K*L)^2 Gram matrices of a (sample, group):
    # sum_{t,s} (patch_t . patch_s)(g_t . g_s), patches gathered from x as in the direct kernel.
    i = tl.program_id(0) // groups
    grp = tl.program_id(0) % groups
    pid_t = tl.program_id(1)
    pid_s = tl.program_id(2)
    # Both Grams are symmetric: only s >= t tiles do work (the others get empty loops and store
    # 0), and off-diagonal tiles count twice.
    upper = (pid_s >= pid_t).to(tl.int32)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = pid_s * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t, in_s = offs_t < n_red, offs_s < n_red
    row_t, pos_t = (i * K + offs_t // L).to(tl.int64), offs_t % L
    row_s, pos_s = (i * K + offs_s // L).to(tl.int64), offs_s % L
    oh_t, ow_t = pos_t // Wo, pos_t % Wo
    oh_s, ow_s = pos_s // Wo, pos_s % Wo
    gram_x = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for f0 in range(0, J * upper, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        ci, ki, kj = _patch_columns(offs_f, cin_g, KH, KW, CIN_INNER)
        c_in, in_f = grp * cin_g + ci, offs_f < J
        x_t = _load_patches(X, row_t, oh_t, ow_t, in_t, c_in, ki, kj, in_f, H, W,
                            s_xr, s_xc, s_xh, s_xw, SH, SW, PH, PW, DH, DW)
        x_s = _load_patches(X, row_s, oh_s, ow_s, in_s, c_in, ki, kj, in_f, H, W,
                            s_xr, s_xc, s_xh, s_xw, SH, SW, PH, PW, DH, DW)
        gram_x = tl.dot(x_t, tl.trans(x_s), gram_x, input_precision=PRECISION)
    gram_g = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for f0 in range(0, cout_g * upper, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        c_out, in_f = grp * cout_g + offs_f, offs_f < cout_g
        g_t = tl.load(G + row_t[:, None] * s_gr + c_out[None, :] * s_gc + oh_t[:, None] * s_gh
                      + ow_t[:, None] * s_gw, mask=in_t[:, None] & in_f[None, :], other=0.0)
        g_s = tl.load(G + row_s[:, None] * s_gr + c_out[None, :] * s_gc + oh_s[:, None] * s_gh
                      + ow_s[:, None] * s_gw, mask=in_s[:, None] & in_f[None, :], other=0.0)
        gram_g = tl.dot(g_t, tl.trans(g_s), gram_g, input_precision=PRECISION)
    weight = 1.0 + (pid_s > pid_t).to(tl.float32)
    val = tl.sum(tl.sum(gram_x * gram_g, axis=1), axis=0) * weight
    n_tiles = tl.num_programs(1) * tl.num_programs(2)
    tl.store(part + i.to(tl.int64) * n_slots + grp * n_tiles + pid_t * tl.num_programs(2) + pid_s, val)


def _pair(v, name):
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, str):  # the engine resolves "same"/"valid"; the kernel needs numbers
        raise ValueError(f"{name} must be an int or a pair of ints; resolve {v!r} to ints first")
    if len(v) != 2 or not all(isinstance(e, int) for e in v):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return tuple(v)


def _geometry(x, G, kernel_size, K, stride, padding, dilation, groups):
    """Validate a conv's operands; returns (B, geometry constexprs, cin_g, cout_g, J, L, Wo)."""
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
    _, B = _check_inputs(K, x=x, G=G)
    geo = dict(KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw,
               CIN_INNER=x.stride(1) == 1 and Cin > 1)
    cin_g, cout_g = Cin // groups, Cout // groups
    return B, geo, cin_g, cout_g, cin_g * kh * kw, Ho * Wo, Wo


def conv2d_direct_norm(x: torch.Tensor, G: torch.Tensor, kernel_size, K: int = 1, stride=(1, 1),
                       padding=(0, 0), dilation=(1, 1), groups: int = 1, *,
                       allow_tf32: bool = False) -> torch.Tensor:
    """Per-sample ||grad_W||_F^2 of a Conv2d, fp32 (R//K,).

    x: (R, Cin, H, W) layer input (any strides: contiguous or channels_last), G: (R, Cout, Ho, Wo)
    output gradient, R = B*K rows sample-major (sample i's gradient sums its K rows).
    kernel_size, stride, padding, dilation: int or pair of ints.
    """
    B, geo, cin_g, cout_g, J, L, Wo = _geometry(x, G, kernel_size, K, stride, padding, dilation,
                                                groups)
    if B == 0 or J * cout_g * L == 0:
        return torch.zeros(B, device=x.device, dtype=torch.float32)
    kernel = _conv2d_direct_norm_kernel
    # Per-tile partials reduced by torch.sum: deterministic, unlike atomics (see linear_norm).
    n_slots = groups * (triton.cdiv(cout_g, _min_block(kernel, "BLOCK_CO"))
                        * triton.cdiv(J, _min_block(kernel, "BLOCK_J")))
    part = torch.empty((B, n_slots), device=x.device, dtype=torch.float32)
    grid = lambda meta: (B * groups, triton.cdiv(cout_g, meta["BLOCK_CO"]), triton.cdiv(J, meta["BLOCK_J"]))  # noqa: E731
    precision = _dot_precision(x.dtype, allow_tf32)
    H, W = x.shape[2:]
    x, G = _interpretable(x, G)
    kernel[grid](x, G, part, K * L, L, Wo, H, W, K, groups, cin_g, cout_g, J, n_slots,
                 *x.stride(), *G.stride(), **geo, PRECISION=precision)
    used = groups * _n_tiles(kernel, (cout_g, "BLOCK_CO"), (J, "BLOCK_J"))
    return part[:, :used].sum(1)


def conv2d_per_sample_grads(x: torch.Tensor, G: torch.Tensor, kernel_size, K: int = 1, stride=(1, 1),
                            padding=(0, 0), dilation=(1, 1), groups: int = 1, *,
                            allow_tf32: bool = False) -> torch.Tensor:
    """Each sample's Conv2d weight gradient, fp32 (R//K, Cout, Cin/groups, kh, kw): the sum over its
    K rows and output positions of g_pos x_patch(pos)^T. Same contract as `conv2d_direct_norm`; bf16
    and fp16 products are exact in the fp32 accumulator."""
    B, geo, cin_g, cout_g, J, L, Wo = _geometry(x, G, kernel_size, K, stride, padding, dilation,
                                                groups)
    Cout = G.shape[1]
    out = torch.empty((B, Cout, J), device=x.device, dtype=torch.float32)
    shape = (B, Cout, cin_g, geo["KH"], geo["KW"])
    if B == 0 or J * cout_g * L == 0:
        return out.zero_().view(shape)
    grid = lambda meta: (B * groups, triton.cdiv(cout_g, meta["BLOCK_CO"]), triton.cdiv(J, meta["BLOCK_J"]))  # noqa: E731
    precision = _dot_precision(x.dtype, allow_tf32)
    H, W = x.shape[2:]
    x, G = _interpretable(x, G)
    _conv2d_per_sample_grads_kernel[grid](x, G, out, K * L, L, Wo, H, W, K, groups, cin_g, cout_g, J,
                                          *x.stride(), *G.stride(), Cout * J, **geo, PRECISION=precision)
    return out.view(shape)


def conv2d_ghost_norm(x: torch.Tensor, G: torch.Tensor, kernel_size, K: int = 1, stride=(1, 1),
                      padding=(0, 0), dilation=(1, 1), groups: int = 1, *,
                      allow_tf32: bool = False) -> torch.Tensor:
    """Per-sample ||grad_W||_F^2 of a Conv2d via Gram matrices of its output positions, fp32
    (R//K,): ~ B * (K*Ho*Wo)^2 * (Cin*kh*kw + Cout) / groups FLOPs, cheaper than the direct norm
    when K*Ho*Wo is small (the low-resolution levels of a U-Net).  Same contract as
    `conv2d_direct_norm`."""
    B, geo, cin_g, cout_g, J, L, Wo = _geometry(x, G, kernel_size, K, stride, padding, dilation,
                                                groups)
    n_red = K * L
    if B == 0 or J * cout_g * L == 0:
        return torch.zeros(B, device=x.device, dtype=torch.float32)
    kernel = _conv2d_ghost_norm_kernel
    n_slots = groups * triton.cdiv(n_red, _min_block(kernel, "BLOCK_T")) ** 2
    part = torch.empty((B, n_slots), device=x.device, dtype=torch.float32)
    grid = lambda meta: (B * groups, triton.cdiv(n_red, meta["BLOCK_T"]), triton.cdiv(n_red, meta["BLOCK_T"]))  # noqa: E731
    precision = _dot_precision(x.dtype, allow_tf32)
    H, W = x.shape[2:]
    x, G = _interpretable(x, G)
    kernel[grid](x, G, part, n_red, L, Wo, H, W, K, groups, cin_g, cout_g, J, n_slots,
                 *x.stride(), *G.stride(), **geo, PRECISION=precision)
    used = groups * _n_tiles(kernel, (n_red, "BLOCK_T"), (n_red, "BLOCK_T"))
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


def conv2d_per_sample_grads_ref(x: torch.Tensor, G: torch.Tensor, kernel_size, K: int = 1,
                                stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                                groups: int = 1) -> torch.Tensor:
    """The spec of `conv2d_per_sample_grads` through an explicit unfold (fp64 for fp64 inputs)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    R, Cin, Cout = x.shape[0], x.shape[1], G.shape[1]
    cols = F.unfold(x.to(acc), kernel_size, dilation=dilation, padding=padding, stride=stride)
    L = cols.shape[-1]
    cols = cols.reshape(R // K, K, groups, -1, L)
    Gm = G.to(acc).reshape(R // K, K, groups, Cout // groups, L)
    grads = torch.einsum("bkgjl,bkgcl->bgcj", cols, Gm)
    return grads.reshape(R // K, Cout, Cin // groups, *_pair(kernel_size, "kernel_size"))


def conv2d_ghost_norm_ref(x: torch.Tensor, G: torch.Tensor, kernel_size, K: int = 1,
                          stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                          groups: int = 1) -> torch.Tensor:
    """The spec in the ghost form: per group, the elementwise product of the (K*Ho*Wo)^2 Grams of
    the sample's unfold(x) columns and of its output gradients, summed.  fp32 (fp64 for fp64)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    R, Cout = x.shape[0], G.shape[1]
    cols = F.unfold(x.to(acc), kernel_size, dilation=dilation, padding=padding, stride=stride)
    L = cols.shape[-1]
    cols = cols.reshape(R // K, K, groups, -1, L).permute(0, 2, 1, 4, 3).flatten(2, 3)
    Gm = G.to(acc).reshape(R // K, K, groups, Cout // groups, L).permute(0, 2, 1, 4, 3).flatten(2, 3)
    gram_x = cols @ cols.transpose(-1, -2)  # (B, groups, K*L, K*L)
    gram_g = Gm @ Gm.transpose(-1, -2)
    return (gram_x * gram_g).sum((1, 2, 3))
