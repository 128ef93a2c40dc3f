"""Ghost per-sample norm of a Linear layer: ||A_i^T G_i||_F^2 = sum_{t,s} (a_t . a_s)(g_t . g_s).

Tiles over (t, s) blocks of sample i's K*T positions; each program builds the a-Gram and g-Gram
tile with `tl.dot` in fp32 registers, multiplies them elementwise and sums, so neither T'xT' Gram
matrix is ever written.  Cost ~ B*T^2*(d+p): cheaper than direct when T is small (low U-Net levels).
"""
import torch
import triton
import triton.language as tl

from .linear_norm import (_check_tokens, _dot_precision, _interpretable, _min_block, _n_tiles,
                          TuningSpace)

GHOST_SPACE = TuningSpace(
    ("BLOCK_T", "BLOCK_F"),
    tensor_core=[(32, 32, 4, 4), (64, 32, 4, 3), (64, 64, 8, 3), (128, 32, 8, 3)],
    # two Gram tiles in FMA registers: 8 warps, or they spill
    fma=[(32, 32, 8, 3), (64, 32, 8, 3)],
    interp=(16, 16))


@triton.jit
def _gram_tile(X, row_t, tok_t, row_s, tok_s, in_t, in_s, n_f, s_r, s_t, s_f, acc,
               PRECISION: tl.constexpr, BLOCK_F: tl.constexpr):
    # acc += X_t X_s^T over the feature dim, in BLOCK_F chunks.  n_f is 0 for skipped tiles.
    for f0 in range(0, n_f, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        in_f = offs_f[None, :] < n_f
        x_t = tl.load(X + row_t[:, None] * s_r + tok_t[:, None] * s_t + offs_f[None, :] * s_f,
                      mask=in_t[:, None] & in_f, other=0.0)
        x_s = tl.load(X + row_s[:, None] * s_r + tok_s[:, None] * s_t + offs_f[None, :] * s_f,
                      mask=in_s[:, None] & in_f, other=0.0)
        acc = tl.dot(x_t, tl.trans(x_s), acc, input_precision=PRECISION)
    return acc


@triton.autotune(
    configs=GHOST_SPACE.configs,
    key=["n_red", "d", "p", "PRECISION"],  # not the batch: it changes every step (Poisson sampling)
    prune_configs_by={"early_config_prune": GHOST_SPACE.prune(BLOCK_T="n_red", BLOCK_F=("d", "p"))},
)
@triton.jit
def _ghost_norm_kernel(
    A, G, part, n_red, T, d, p, K, n_slots,
    s_ar, s_at, s_ad, s_gr, s_gt, s_gp,
    PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
):
    i = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_s = tl.program_id(2)
    # Both Grams are symmetric, so tile (s, t) equals tile (t, s)^T: only s >= t tiles do work
    # (the others get empty feature loops and store 0), and off-diagonal tiles count twice.
    upper = (pid_s >= pid_t).to(tl.int32)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = pid_s * BLOCK_T + tl.arange(0, BLOCK_T)
    # Position r of the sample is token r % T of row i*K + r // T: any strides, int64 addressing.
    row_t, tok_t = (i * K + offs_t // T).to(tl.int64), (offs_t % T).to(tl.int64)
    row_s, tok_s = (i * K + offs_s // T).to(tl.int64), (offs_s % T).to(tl.int64)
    in_t, in_s = offs_t < n_red, offs_s < n_red
    zero = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    gram_a = _gram_tile(A, row_t, tok_t, row_s, tok_s, in_t, in_s, d * upper, s_ar, s_at, s_ad,
                        zero, PRECISION, BLOCK_F)
    gram_g = _gram_tile(G, row_t, tok_t, row_s, tok_s, in_t, in_s, p * upper, s_gr, s_gt, s_gp,
                        zero, PRECISION, BLOCK_F)
    weight = 1.0 + (pid_s > pid_t).to(tl.float32)
    val = tl.sum(tl.sum(gram_a * gram_g, axis=1), axis=0) * weight
    tl.store(part + i.to(tl.int64) * n_slots + pid_t * tl.num_programs(2) + pid_s, val)


def ghost_norm(A: torch.Tensor, G: torch.Tensor, K: int = 1, *,
               allow_tf32: bool = False) -> torch.Tensor:
    """Per-sample ||grad_W||_F^2 of a Linear layer via Gram matrices, fp32 (R//K,).

    Same contract as `linear_direct_norm`: A (R, T, d), G (R, T, p), R = B*K rows sample-major.
    """
    B, T, d, p = _check_tokens(A, G, K)
    n_red = K * T
    if B == 0 or T * d * p == 0:
        return torch.zeros(B, device=A.device, dtype=torch.float32)
    # One partial per (t, s) tile, summed by torch: deterministic, and ~BLOCK_T^2 times smaller
    # than the Gram matrices (lower-triangle slots hold zeros).
    kernel = _ghost_norm_kernel
    n_slots = triton.cdiv(n_red, _min_block(kernel, "BLOCK_T")) ** 2
    part = torch.empty((B, n_slots), device=A.device, dtype=torch.float32)
    grid = lambda meta: (B, triton.cdiv(n_red, meta["BLOCK_T"]), triton.cdiv(n_red, meta["BLOCK_T"]))  # noqa: E731
    precision = _dot_precision(A.dtype, allow_tf32)
    A, G = _interpretable(A, G)
    kernel[grid](A, G, part, n_red, T, d, p, K, n_slots, *A.stride(), *G.stride(),
                 PRECISION=precision)
    return part[:, :_n_tiles(kernel, (n_red, "BLOCK_T"), (n_red, "BLOCK_T"))].sum(1)


def ghost_norm_ref(A: torch.Tensor, G: torch.Tensor, K: int = 1) -> torch.Tensor:
    """The spec, in the ghost form: sum of the elementwise product of the two (K*T)^2 Grams.
    Computes in fp32 (fp64 for fp64 inputs)."""
    R, T, d = A.shape
    acc = torch.float64 if A.dtype == torch.float64 else torch.float32
    A = A.to(acc).reshape(R // K, K * T, d)
    G = G.to(acc).reshape(R // K, K * T, G.shape[-1])
    return (torch.bmm(A, A.transpose(1, 2)) * torch.bmm(G, G.transpose(1, 2))).sum((1, 2))
