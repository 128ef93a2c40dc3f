"""The clipped weight gradient, fused: sum over samples i of s[i] * (sample i's weight gradient, summed
over its K rows), in fp32.

This is the sum the Gaussian noise covers, so its error is privacy-relevant: the accountant assumes
one sample moves it by at most max_grad_norm.  cuBLAS/cuDNN would need G scaled by s first (a copy
of G) and, on bf16/fp16 inputs, round both s*G and the summed gradient to 8 mantissa bits: an error
of ~2^-9 of the sum, which for a large batch of aligned gradients is a good fraction of
max_grad_norm.  Here each sample's product (its K rows together) is formed by `tl.dot` from the
inputs as they are (bf16 x bf16 products are exact in fp32), scaled by its clip factor in fp32 and
accumulated in fp32; nothing is rounded below fp32.

Work is split over samples (`n_split` programs per output tile, their fp32 partial tiles summed by
torch: deterministic, no atomics) so that a layer with few output tiles still fills the GPU.
"""
import torch
import triton
import triton.language as tl

from .conv_norm import _geometry, _patch_columns, _sample_conv_grad
from .linear_norm import TuningSpace, _check_tokens, _interpretable, _sample_linear_grad

# bf16/fp16 only (fp32 has cuBLAS/cuDNN's exact fp32 GEMMs): the tensor-core configs of the norm
# kernels that stay spill-free with the second (per-row) accumulator; `dpfast check-kernels`.
LINEAR_WGRAD_SPACE = TuningSpace(
    ("BLOCK_T", "BLOCK_D", "BLOCK_P"),
    tensor_core=[(32, 32, 32, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 8, 3), (32, 128, 128, 8, 3),
                 (64, 128, 64, 8, 3), (64, 64, 128, 8, 3)],
    fma=[], interp=(16, 16, 16))
CONV_WGRAD_SPACE = TuningSpace(
    ("BLOCK_N", "BLOCK_CO", "BLOCK_J"),
    tensor_core=[(32, 32, 32, 8, 3), (32, 64, 64, 4, 4), (64, 64, 64, 8, 3), (32, 128, 128, 8, 3)],
    fma=[], interp=(16, 16, 16))
_HALF = (torch.bfloat16, torch.float16)

# Programs to aim for per launch: a few waves of a 132-SM H100.
_TARGET_PROGRAMS = 1024


def _splits(samples: int, tiles: int) -> tuple[int, int]:
    """(n_split, samples per split) so that n_split * tiles ~ _TARGET_PROGRAMS."""
    want = max(1, min(samples, triton.cdiv(_TARGET_PROGRAMS, max(1, tiles))))
    per = triton.cdiv(samples, want)
    return triton.cdiv(samples, per), per


def _half_only(t: torch.Tensor, name: str) -> None:
    if t.dtype not in _HALF:
        raise ValueError(f"{name} must be bfloat16 or float16, got {t.dtype}: the fused clipped "
                         "gradient is the low-precision path; fp32 inputs get exact fp32 GEMMs from "
                         "cuBLAS/cuDNN (as dpfast's rules do)")


def _sample_scale(s: torch.Tensor, B: int, device) -> torch.Tensor:
    if s.dim() != 1 or s.shape[0] != B:
        raise ValueError(f"s must hold one clip factor per sample: shape ({B},), got {tuple(s.shape)}")
    return s.to(device=device, dtype=torch.float32).contiguous()


@triton.autotune(
    configs=LINEAR_WGRAD_SPACE.configs,
    key=["n_red", "d", "p"],  # not the batch: it changes every step under Poisson sampling
    prune_configs_by={"early_config_prune": LINEAR_WGRAD_SPACE.prune(BLOCK_D="d", BLOCK_P="p")},
)
@triton.jit
def _linear_clipped_wgrad_kernel(
    A, G, S, part, B, n_red, T, d, p, K, per_split,
    s_ar, s_at, s_ad, s_gr, s_gt, s_gp,
    PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # One program = one (sample split, p-tile, d-tile) of sum_i s_i G_i^T A_i, a (p, d) weight
    # gradient; sample i's K rows and T tokens (n_red = K*T positions) reduce together.
    split = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D, BLOCK_P), dtype=tl.float32)
    i_end = tl.minimum(split * per_split + per_split, B)
    for i in range(split * per_split, i_end):
        acc_i = _sample_linear_grad(A, G, i, K, n_red, T, offs_d, offs_p, d, p, s_ar, s_at, s_ad,
                                    s_gr, s_gt, s_gp, PRECISION, BLOCK_T, BLOCK_D, BLOCK_P)
        acc += tl.load(S + i) * acc_i  # the sample's clip factor, applied in fp32
    # the tile is (d, p) of A^T G; the weight gradient is its transpose, (p, d) row-major
    out = part + split.to(tl.int64) * p * d + offs_p[None, :] * d + offs_d[:, None]
    tl.store(out, acc, mask=(offs_d[:, None] < d) & (offs_p[None, :] < p))


def linear_clipped_wgrad(A: torch.Tensor, G: torch.Tensor, s: torch.Tensor, K: int = 1) -> torch.Tensor:
    """sum_i s[i] * sum over sample i's K rows and T tokens of g_t a_t^T: the clipped (p, d)
    weight gradient of a Linear layer, fp32.

    A: (R, T, d) input, G: (R, T, p) output gradient (any strides, bf16/fp16, same dtype),
    R = B*K rows sample-major, s: (B,) clip factor of each sample."""
    _half_only(A, "A")
    B, T, d, p = _check_tokens(A, G, K)
    S = _sample_scale(s, B, A.device)
    if B == 0 or T == 0:
        return torch.zeros((p, d), device=A.device, dtype=torch.float32)
    n_split, per = _splits(B, triton.cdiv(p, 64) * triton.cdiv(d, 64))
    part = torch.empty((n_split, p, d), device=A.device, dtype=torch.float32)
    grid = lambda meta: (n_split, triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(d, meta["BLOCK_D"]))  # noqa: E731
    A, G = _interpretable(A, G)
    _linear_clipped_wgrad_kernel[grid](A, G, S, part, B, K * T, T, d, p, K, per, *A.stride(),
                                       *G.stride(), PRECISION="ieee")
    return part.sum(0) if n_split > 1 else part[0]


def linear_clipped_wgrad_ref(A, G, s, K: int = 1) -> torch.Tensor:
    """The spec in fp64 (fp32 result unless the inputs are fp64)."""
    out = torch.float64 if A.dtype == torch.float64 else torch.float32
    S = s.double().repeat_interleave(K)
    return torch.einsum("r,rtp,rtd->pd", S, G.double(), A.double()).to(out)


@triton.autotune(
    configs=CONV_WGRAD_SPACE.configs,
    key=["n_red", "cout_g", "J", "KH", "KW", "SH", "SW", "CIN_INNER"],
    prune_configs_by={"early_config_prune": CONV_WGRAD_SPACE.prune(BLOCK_CO="cout_g", BLOCK_J="J")},
)
@triton.jit
def _conv2d_clipped_wgrad_kernel(
    X, G, S, part, B, n_red, L, Wo, H, W, K, groups, cin_g, cout_g, J, per_split,
    s_xr, s_xc, s_xh, s_xw, s_gr, s_gc, s_gh, s_gw,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, CIN_INNER: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_J: tl.constexpr,
):
    # One program = one (sample split, group, cout-tile, patch-column tile) of the clipped
    # gradient; sample i's K rows and L output positions (n_red = K*L) reduce together.
    split = tl.program_id(0) // groups
    grp = tl.program_id(0) % groups
    offs_co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    ci, ki, kj = _patch_columns(offs_j, cin_g, KH, KW, CIN_INNER)
    c_in, c_out = grp * cin_g + ci, grp * cout_g + offs_co
    in_co, in_j = offs_co < cout_g, offs_j < J
    acc = tl.zeros((BLOCK_CO, BLOCK_J), dtype=tl.float32)
    i_end = tl.minimum(split * per_split + per_split, B)
    for i in range(split * per_split, i_end):
        acc_i = _sample_conv_grad(X, G, i, K, n_red, L, Wo, H, W, c_out, in_co, c_in, ki, kj, in_j,
                                  s_xr, s_xc, s_xh, s_xw, s_gr, s_gc, s_gh, s_gw, SH, SW, PH, PW,
                                  DH, DW, PRECISION, BLOCK_N, BLOCK_CO, BLOCK_J)
        acc += tl.load(S + i) * acc_i  # the sample's clip factor, applied in fp32
    # Stored in the weight's own (Cout, Cin/groups, kh, kw) layout, whatever the column order.
    col = ci * (KH * KW) + ki * KW + kj
    out = part + split.to(tl.int64) * groups * cout_g * J + c_out[:, None] * J + col[None, :]
    tl.store(out, acc, mask=in_co[:, None] & in_j[None, :])


def conv2d_clipped_wgrad(x: torch.Tensor, G: torch.Tensor, s: torch.Tensor, kernel_size, K: int = 1,
                         stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                         groups: int = 1) -> torch.Tensor:
    """sum_i s[i] * (sample i's weight gradient, over its K rows) of a Conv2d, fp32, shaped like the
    weight (Cout, Cin/groups, kh, kw).  x: (R, Cin, H, W), G: (R, Cout, Ho, Wo) (any strides,
    bf16/fp16), R = B*K rows sample-major, s: (B,) clip factor of each sample; the other arguments
    as for `conv2d_direct_norm`."""
    _half_only(x, "x")
    B, geo, cin_g, cout_g, J, L, Wo = _geometry(x, G, kernel_size, K, stride, padding, dilation,
                                                groups)
    Cout = G.shape[1]
    S = _sample_scale(s, B, x.device)
    shape = (Cout, cin_g, geo["KH"], geo["KW"])
    if B == 0 or L == 0:
        return torch.zeros(shape, device=x.device, dtype=torch.float32)
    tiles = groups * triton.cdiv(cout_g, 64) * triton.cdiv(J, 64)
    n_split, per = _splits(B, tiles)
    part = torch.empty((n_split, Cout * J), device=x.device, dtype=torch.float32)
    grid = lambda meta: (n_split * groups, triton.cdiv(cout_g, meta["BLOCK_CO"]), triton.cdiv(J, meta["BLOCK_J"]))  # noqa: E731
    H, W = x.shape[2:]
    x, G = _interpretable(x, G)
    _conv2d_clipped_wgrad_kernel[grid](x, G, S, part, B, K * L, L, Wo, H, W, K, groups, cin_g,
                                       cout_g, J, per, *x.stride(), *G.stride(), **geo,
                                       PRECISION="ieee")
    return (part.sum(0) if n_split > 1 else part[0]).reshape(shape)


def conv2d_clipped_wgrad_ref(x, G, s, kernel_size, K: int = 1, stride=(1, 1), padding=(0, 0),
                             dilation=(1, 1), groups: int = 1) -> torch.Tensor:
    """The spec in fp64 through unfold (fp32 result unless the inputs are fp64)."""
    import torch.nn.functional as F

    out = torch.float64 if x.dtype == torch.float64 else torch.float32
    R, Cin, Cout = x.shape[0], x.shape[1], G.shape[1]
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    cols = F.unfold(x.double(), (kh, kw), dilation=dilation, padding=padding, stride=stride)
    cols = cols.reshape(R, groups, Cin // groups * kh * kw, -1)
    Gm = G.double().reshape(R, groups, Cout // groups, -1)
    gw = torch.einsum("r,rgcl,rgjl->gcj", s.double().repeat_interleave(K), Gm, cols)
    return gw.reshape(Cout, Cin // groups, kh, kw).to(out)
