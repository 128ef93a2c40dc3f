"""Direct per-sample norm of a Linear layer's weight gradient: ||sum_t a_t g_t^T||_F^2 per sample.

The (d, p) gradient of a sample is formed tile by tile in fp32 registers by `tl.dot`, squared and
summed; only one float per tile leaves the kernel.  Cost ~ 2*B*T*d*p, the weight-gradient FLOPs.
"""
import os

import torch
import triton
import triton.language as tl

# Triton decides interpreter-or-not when a kernel is decorated; the tuning space follows it.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _configs(names, rows):
    """triton.Config list from (block sizes..., num_warps, num_stages) rows."""
    return [triton.Config(dict(zip(names, r[:-2])), num_warps=r[-2], num_stages=r[-1]) for r in rows]


def _config_key(c):
    return tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages


class TuningSpace:
    """A kernel's autotuning configs, in two families: `tensor_core` for the dots that run on tensor
    cores (bf16, fp16, fp32 as tf32) and `fma` for fp32 'ieee' dots, which run on the FMA units
    and hold far more in registers.  Every config of both lists compiles for sm_90 without register
    spills for each case of `compile_check` (`dpfast check-kernels` re-checks it).

    Under the interpreter a single small config skips benchmarking and keeps tests fast; 16 is the
    smallest tile tl.dot accepts on a GPU, so the interpreted code is the GPU code."""

    def __init__(self, names, tensor_core, fma, interp):
        self.tensor_core, self.fma = _configs(names, tensor_core), _configs(names, fma)
        self.interp = [triton.Config(dict(zip(names, interp)), num_warps=4)]

    @property
    def configs(self):
        """What the autotuner is given (the union; `prune` picks the family per launch)."""
        if INTERPRET:
            return self.interp
        keys = {_config_key(c) for c in self.tensor_core}
        return self.tensor_core + [c for c in self.fma if _config_key(c) not in keys]

    def family(self, dtype, precision):
        """The configs for inputs of `dtype` with tl.dot input_precision `precision`."""
        if INTERPRET:
            return self.interp
        return self.fma if dtype == torch.float32 and precision == "ieee" else self.tensor_core

    def prune(self, **dims):
        """`early_config_prune`: the family of this launch's dtype and PRECISION, without tiles
        wider than the padded dim (on a 3-channel layer a 128 tile is 97% masked-out work).
        `dims` maps a block name to the kernel argument(s) it tiles.  Keeps at least one config."""
        def prune(configs, named_args, **kwargs):
            dtype = next(v.dtype for v in named_args.values() if isinstance(v, torch.Tensor))
            keys = {_config_key(c) for c in self.family(dtype, kwargs.get("PRECISION"))}
            configs = [c for c in configs if _config_key(c) in keys] or configs

            def size(names):
                return max(named_args[n] for n in ((names,) if isinstance(names, str) else names))

            def fits(c):
                return all(c.kwargs[blk] <= max(32, triton.next_power_of_2(size(names)))
                           for blk, names in dims.items())
            kept = [c for c in configs if fits(c)]
            return kept or [min(configs, key=lambda c: sum(c.kwargs[b] for b in dims))]
        return prune


def _min_block(kernel, name):
    """Smallest tile any config of `kernel` uses along `name`: sizes the partials buffer."""
    return min(c.kwargs[name] for c in kernel.configs)


def _n_tiles(kernel, *sizes_and_blocks):
    """Tiles per sample of the config the autotuner ran last (`best_config`): the launcher
    reads exactly those partial slots, so leftovers from benchmarking other configs never count."""
    cfg = kernel.best_config.kwargs
    n = 1
    for size, blk in sizes_and_blocks:
        n *= triton.cdiv(size, cfg[blk])
    return n


def _check_inputs(K, **tensors):
    """Shared boundary checks: dtype, device, multiplicity.  Returns (R, B)."""
    n0, t0 = next(iter(tensors.items()))
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.dtype != t0.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {n0} has {t0.dtype}; they must match")
        if t.device != t0.device:
            raise ValueError(f"{name} is on {t.device} but {n0} is on {t0.device}")
    if t0.device.type == "cpu" and not INTERPRET:
        raise ValueError("Triton norm kernels need CUDA tensors (or TRITON_INTERPRET=1 set before "
                         "the kernels are imported); on CPU use the torch backend or the *_ref "
                         "functions")
    if not isinstance(K, int) or K < 1:
        raise ValueError(f"multiplicity K must be an int >= 1, got {K!r}")
    R = t0.shape[0]
    if R % K:
        raise ValueError(f"{n0} has {R} rows, not a multiple of the multiplicity K={K}")
    return R, R // K


_INT32_MAX = 2**31 - 1


def _row_addressable(t: torch.Tensor) -> torch.Tensor:
    """The kernels index rows in int64 but offsets within a row in int32: a tensor whose row
    extent passes 2^31 elements (an exotic layout, say channels outermost) is made contiguous
    first, and one whose single row is that large is refused."""
    extent = sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:]))
    if extent <= _INT32_MAX:
        return t
    t = t.contiguous()
    if t[0].numel() > _INT32_MAX:
        raise ValueError(f"one row of a {tuple(t.shape)} tensor has over 2^31 elements; the "
                         "Triton kernels address within a row in int32 (use backend='torch')")
    return t


def _check_tokens(A, G, K):
    """Shared boundary checks of the token-shaped launchers: A (R, T, d), G (R, T, p), R = B*K.
    Returns (B, T, d, p)."""
    if A.dim() != 3:
        raise ValueError(f"A must be (R, T, d), got shape {tuple(A.shape)}")
    if G.dim() != 3 or G.shape[:2] != A.shape[:2]:
        raise ValueError(f"G must be (R, T, p) = ({A.shape[0]}, {A.shape[1]}, p), "
                         f"got shape {tuple(G.shape)}")
    _, B = _check_inputs(K, A=A, G=G)
    return B, A.shape[1], A.shape[2], G.shape[2]


def _interpretable(*tensors):
    """Inputs as the kernels take them: rows addressable in int32 (`_row_addressable`), and under
    the interpreter bf16 upcast to fp32, because the interpreter keeps bf16 as raw uint16 and its
    tl.dot multiplies the bit patterns (triton-lang/triton#11584); bf16 -> fp32 is exact, so that
    gives what the GPU computes."""
    tensors = tuple(_row_addressable(t) for t in tensors)
    if not INTERPRET:
        return tensors
    return tuple(t.float() if t.dtype == torch.bfloat16 else t for t in tensors)


def _dot_precision(dtype, allow_tf32):
    # fp32 inputs: true fp32 unless the caller opts into TF32 (as torch's own conv/matmul flags do);
    # the flag is ignored for bf16/fp16 inputs.
    return "tf32" if (allow_tf32 and dtype == torch.float32) else "ieee"


@triton.jit
def _sample_linear_grad(A, G, i, K, n_red, T, offs_d, offs_p, d, p,
                        s_ar, s_at, s_ad, s_gr, s_gt, s_gp, PRECISION: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    """The (d-tile, p-tile) of sample i's weight gradient A_i^T G_i, fp32: its K rows and T tokens
    (n_red = K*T positions) reduce together.  Shared by the norm and the clipped-gradient kernels."""
    acc = tl.zeros((BLOCK_D, BLOCK_P), dtype=tl.float32)
    for r0 in range(0, n_red, BLOCK_T):
        # Reduction index r covers the K rows of the sample and their T tokens; row/token are
        # split so arbitrary strides work, and promoted to int64 before scaling by strides.
        r = r0 + tl.arange(0, BLOCK_T)
        row = (i * K + r // T).to(tl.int64)
        tok = (r % T).to(tl.int64)
        in_r = r < n_red
        a = tl.load(A + row[:, None] * s_ar + tok[:, None] * s_at + offs_d[None, :] * s_ad,
                    mask=in_r[:, None] & (offs_d[None, :] < d), other=0.0)
        g = tl.load(G + row[:, None] * s_gr + tok[:, None] * s_gt + offs_p[None, :] * s_gp,
                    mask=in_r[:, None] & (offs_p[None, :] < p), other=0.0)
        acc = tl.dot(tl.trans(a), g, acc, input_precision=PRECISION)
    return acc


LINEAR_SPACE = TuningSpace(
    ("BLOCK_T", "BLOCK_D", "BLOCK_P"),
    tensor_core=[(32, 32, 32, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 3), (32, 128, 64, 4, 3),
                 (32, 64, 128, 4, 3), (32, 128, 128, 8, 3), (64, 128, 64, 8, 3),
                 (64, 64, 128, 8, 3)],
    fma=[(32, 32, 32, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 3), (32, 128, 128, 8, 3)],
    interp=(16, 16, 16))


# Key leaves out the batch: Poisson sampling changes it every step and must not trigger re-tuning.
@triton.autotune(
    configs=LINEAR_SPACE.configs,
    key=["n_red", "d", "p", "PRECISION"],
    prune_configs_by={"early_config_prune": LINEAR_SPACE.prune(BLOCK_D="d", BLOCK_P="p")},
)
@triton.jit
def _linear_direct_norm_kernel(
    A, G, part, n_red, T, d, p, K, n_slots,
    s_ar, s_at, s_ad, s_gr, s_gt, s_gp,
    PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # One program = one (sample, d-tile, p-tile) of M_i = A_i^T G_i, reduced over the K*T positions.
    i = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_p = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    acc = _sample_linear_grad(A, G, i, K, n_red, T, offs_d, offs_p, d, p, s_ar, s_at, s_ad, s_gr,
                              s_gt, s_gp, PRECISION, BLOCK_T, BLOCK_D, BLOCK_P)
    sq = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
    # int64: B * n_slots passes 2^31 for large batches of long sequences
    tl.store(part + i.to(tl.int64) * n_slots + pid_d * tl.num_programs(2) + pid_p, sq)


def linear_direct_norm(A: torch.Tensor, G: torch.Tensor, K: int = 1, *,
                       allow_tf32: bool = False) -> torch.Tensor:
    """Per-sample ||grad_W||_F^2 of a Linear layer, fp32 (R//K,).

    A: (R, T, d) layer input, G: (R, T, p) output gradient, R = B*K rows sample-major; sample i's
    gradient is sum over its K rows and T tokens of a_t g_t^T.  Any strides.
    """
    B, T, d, p = _check_tokens(A, G, K)
    if B == 0 or T * d * p == 0:
        return torch.zeros(B, device=A.device, dtype=torch.float32)
    # Per-tile partials, reduced by torch.sum, instead of atomics on out[i]: the result is
    # bit-reproducible run to run (atomics add in arbitrary order), and the extra memory is tiny.
    # Sized for the smallest tiles any config uses; the tuned config may fill fewer slots.
    kernel = _linear_direct_norm_kernel
    n_slots = (triton.cdiv(d, _min_block(kernel, "BLOCK_D"))
               * triton.cdiv(p, _min_block(kernel, "BLOCK_P")))
    part = torch.empty((B, n_slots), device=A.device, dtype=torch.float32)
    grid = lambda meta: (B, triton.cdiv(d, meta["BLOCK_D"]), triton.cdiv(p, meta["BLOCK_P"]))  # noqa: E731
    precision = _dot_precision(A.dtype, allow_tf32)
    A, G = _interpretable(A, G)
    kernel[grid](A, G, part, K * T, T, d, p, K, n_slots, *A.stride(), *G.stride(),
                 PRECISION=precision)
    return part[:, :_n_tiles(kernel, (d, "BLOCK_D"), (p, "BLOCK_P"))].sum(1)


def linear_direct_norm_ref(A: torch.Tensor, G: torch.Tensor, K: int = 1) -> torch.Tensor:
    """The spec: M_i = A_i^T G_i over sample i's K*T positions, ||M_i||_F^2.  Computes in fp32
    (fp64 for fp64 inputs, so it can serve as the oracle)."""
    R, T, d = A.shape
    acc = torch.float64 if A.dtype == torch.float64 else torch.float32
    A = A.to(acc).reshape(R // K, K * T, d)
    G = G.to(acc).reshape(R // K, K * T, G.shape[-1])
    return torch.bmm(A.transpose(1, 2), G).square().sum((1, 2))
