"""Triton kernels for per-sample squared gradient norms (the GPU fast path).

Installed as ``dpfast.kernels``; loaded from the source tree as ``kernels`` otherwise, so every
import inside this package is relative.  Importing this package never fails: without Triton,
``HAS_TRITON`` is False, ``TRITON_IMPORT_ERROR`` says why, and nothing else is exposed (the engine
then uses its ``torch`` backend).  The engine chooses direct or ghost per layer with the modelled
kernel cost of ``dpfast.rules._norms.kernel_cost``.

Every norm launcher returns, per *sample*, the squared Frobenius norm of the weight gradient, fp32,
(B,). Rows are sample-major with multiplicity K (rows i*K .. i*K+K-1 are sample i, summed).
The clipped weight-gradient launchers (`clipped_wgrad.py`) return sum_r s[r] * grad_r in fp32, and
`conv2d_per_sample_grads` each sample's weight gradient (the materialize strategy's tile, written).
"""
import os

# Note: after `from .ghost_norm import ghost_norm` the package attribute `ghost_norm` is the
# launcher, not the submodule; import submodules by path (`from kernels.ghost_norm import ...`).
__all__ = ["HAS_TRITON", "TRITON_IMPORT_ERROR", "INTERPRET"]

# Triton decides interpreter-or-compiler when a kernel is decorated, i.e. when this package loads.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

try:
    import triton  # noqa: F401
except Exception as e:  # a broken install must not break `import dpfast` on a CPU box
    HAS_TRITON, TRITON_IMPORT_ERROR = False, f"{type(e).__name__}: {e}"
else:
    HAS_TRITON, TRITON_IMPORT_ERROR = True, None

if HAS_TRITON:
    from .conv_norm import (conv2d_direct_norm, conv2d_direct_norm_ref, conv2d_ghost_norm,
                            conv2d_ghost_norm_ref, conv2d_per_sample_grads, conv2d_per_sample_grads_ref)
    from .ghost_norm import ghost_norm, ghost_norm_ref
    from .clipped_wgrad import (conv2d_clipped_wgrad, conv2d_clipped_wgrad_ref, linear_clipped_wgrad,
                                linear_clipped_wgrad_ref)
    from .linear_norm import linear_direct_norm, linear_direct_norm_ref
    from . import ops  # torch.ops.dpfast.* custom ops: what the engine calls (kernels.ops.*)

    __all__ += ["ops", "linear_direct_norm", "linear_direct_norm_ref", "conv2d_direct_norm",
                "conv2d_direct_norm_ref", "conv2d_ghost_norm", "conv2d_ghost_norm_ref", "ghost_norm",
                "ghost_norm_ref", "linear_clipped_wgrad", "linear_clipped_wgrad_ref",
                "conv2d_clipped_wgrad", "conv2d_clipped_wgrad_ref", "conv2d_per_sample_grads",
                "conv2d_per_sample_grads_ref"]
