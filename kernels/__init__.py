"""Triton kernels for per-sample squared gradient norms (the GPU fast path).

Installed as ``dpfast.kernels``; loaded from the source tree as ``kernels`` otherwise, so every
import inside this package is relative.  Importing this package never fails: without Triton,
``HAS_TRITON`` is False, ``TRITON_IMPORT_ERROR`` says why, and only the cost model is exposed
(the engine then uses its ``torch`` backend).

Every launcher returns, per *sample*, the squared Frobenius norm of the weight gradient, fp32, (B,).
Rows are sample-major with multiplicity K (rows i*K .. i*K+K-1 are sample i, summed).
"""
import os

# Note: after `from .ghost_norm import ghost_norm` the package attribute `ghost_norm` is the
# launcher, not the submodule; import submodules by path (`from kernels.ghost_norm import ...`).
__all__ = ["HAS_TRITON", "TRITON_IMPORT_ERROR", "INTERPRET", "direct_cost", "ghost_cost"]

# Triton decides interpreter-or-compiler when a kernel is decorated, i.e. when this package loads.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

try:
    import triton  # noqa: F401
except Exception as e:  # a broken install must not break `import dpfast` on a CPU box
    HAS_TRITON, TRITON_IMPORT_ERROR = False, f"{type(e).__name__}: {e}"
else:
    HAS_TRITON, TRITON_IMPORT_ERROR = True, None

if HAS_TRITON:
    from .conv_norm import conv2d_direct_norm, conv2d_direct_norm_ref
    from .ghost_norm import ghost_norm, ghost_norm_ref
    from .linear_norm import linear_direct_norm, linear_direct_norm_ref
    from . import ops  # torch.ops.dpfast.* custom ops: what the engine calls (kernels.ops.*)

    __all__ += ["ops", "linear_direct_norm", "linear_direct_norm_ref", "conv2d_direct_norm",
                "conv2d_direct_norm_ref", "ghost_norm", "ghost_norm_ref"]


# Cost model (FLOPs) for choosing direct vs ghost per layer.  `T` is the reduction length per
# sample *including* multiplicity (K * tokens, or K * Ho * Wo for a conv); for a conv, d is
# Cin/groups*kh*kw, p is Cout/groups and B is batch*groups.  Both kernels are compute bound at
# the shapes where the choice matters, so FLOPs are a fair proxy; what the model still needs on a
# real GPU is (a) the efficiency of each kernel at small tiles (ghost with T < 64 and direct with
# d or p < 64 waste most of a 64-wide tensor-core tile) and (b) the extra memory traffic of ghost,
# which re-reads A and G once per tile pair: ~ B * T^2 / BLOCK_T * (d + p) elements.
def direct_cost(B: int, T: int, d: int, p: int) -> float:
    """FLOPs of `linear_direct_norm`/`conv2d_direct_norm`: the weight-gradient GEMM, 2*B*T*d*p."""
    return 2.0 * B * T * d * p


def ghost_cost(B: int, T: int, d: int, p: int) -> float:
    """FLOPs of `ghost_norm`: two Gram matrices over the upper triangle of (t, s) tiles,
    ~ 2 * B * (T^2 / 2) * (d + p), plus the elementwise product-sum, ~ B * T^2."""
    return B * T * T * (d + p) + float(B) * T * T
