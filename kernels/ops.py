"""The norm launchers as `torch.library` custom ops (`torch.ops.dpfast.*`).

Opaque to torch.compile, which traces around them using the fake (meta) implementations: output
(R // K,) fp32 on the input's device.  Where `torch.library.custom_op` is missing (torch < 2.4)
the plain launchers are exposed instead, under the same names.
"""
from typing import Sequence

import torch

from . import HAS_TRITON, TRITON_IMPORT_ERROR

if not HAS_TRITON:
    raise ImportError(f"dpfast.kernels.ops needs Triton ({TRITON_IMPORT_ERROR}); "
                      "use the engine's torch backend instead")

# Functions, not modules: the package's `ghost_norm` attribute is the launcher, which shadows
# the submodule of the same name.
from .conv_norm import _pair, conv2d_direct_norm as _conv_launcher  # noqa: E402
from .conv_norm import conv2d_ghost_norm as _conv_ghost_launcher  # noqa: E402
from .conv_norm import conv2d_per_sample_grads as _conv_psg_launcher  # noqa: E402
from .clipped_wgrad import conv2d_clipped_wgrad as _conv_wgrad_launcher  # noqa: E402
from .clipped_wgrad import linear_clipped_wgrad as _linear_wgrad_launcher  # noqa: E402
from .ghost_norm import ghost_norm as _ghost_launcher  # noqa: E402
from .linear_norm import linear_direct_norm as _linear_launcher  # noqa: E402

__all__ = ["linear_direct_norm", "ghost_norm", "conv2d_direct_norm", "conv2d_ghost_norm",
           "linear_clipped_wgrad", "conv2d_clipped_wgrad", "conv2d_per_sample_grads"]


def _fake_norms(t: torch.Tensor, K: int) -> torch.Tensor:
    torch._check(K >= 1 and t.shape[0] % K == 0, lambda: f"{t.shape[0]} rows, multiplicity {K}")
    return t.new_empty((t.shape[0] // K,), dtype=torch.float32)


def _custom_op(name, fn, fake):
    """Register `fn` as dpfast::name.  The source-tree `kernels` and the installed
    `dpfast.kernels` can both be imported in one process; the second import reuses the op."""
    if not hasattr(torch.library, "custom_op"):
        return fn
    if hasattr(torch.ops.dpfast, name):
        return getattr(torch.ops.dpfast, name)
    op = torch.library.custom_op(f"dpfast::{name}", fn, mutates_args=())
    op.register_fake(fake)
    return op


def _linear_direct_norm(A: torch.Tensor, G: torch.Tensor, K: int = 1,
                        allow_tf32: bool = False) -> torch.Tensor:
    return _linear_launcher(A, G, K, allow_tf32=allow_tf32)


def _ghost_norm(A: torch.Tensor, G: torch.Tensor, K: int = 1,
                allow_tf32: bool = False) -> torch.Tensor:
    return _ghost_launcher(A, G, K, allow_tf32=allow_tf32)


def _conv2d_direct_norm(x: torch.Tensor, G: torch.Tensor, kernel_size: Sequence[int], K: int,
                        stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                        groups: int, allow_tf32: bool = False) -> torch.Tensor:
    return _conv_launcher(x, G, tuple(kernel_size), K, tuple(stride), tuple(padding),
                          tuple(dilation), groups, allow_tf32=allow_tf32)


linear_direct_norm = _custom_op(
    "linear_direct_norm", _linear_direct_norm,
    lambda A, G, K=1, allow_tf32=False: _fake_norms(A, K))
ghost_norm = _custom_op(
    "ghost_norm", _ghost_norm, lambda A, G, K=1, allow_tf32=False: _fake_norms(A, K))


def _conv2d_ghost_norm(x: torch.Tensor, G: torch.Tensor, kernel_size: Sequence[int], K: int,
                       stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                       groups: int, allow_tf32: bool = False) -> torch.Tensor:
    return _conv_ghost_launcher(x, G, tuple(kernel_size), K, tuple(stride), tuple(padding),
                                tuple(dilation), groups, allow_tf32=allow_tf32)


def _fake_conv(x, G, kernel_size, K, stride, padding, dilation, groups, allow_tf32=False):
    return _fake_norms(x, K)


_conv_op = _custom_op("conv2d_direct_norm", _conv2d_direct_norm, _fake_conv)
_conv_ghost_op = _custom_op("conv2d_ghost_norm", _conv2d_ghost_norm, _fake_conv)


def _conv_call(op, x, G, kernel_size, K, stride, padding, dilation, groups, allow_tf32):
    # The op schema takes int lists: ints are widened to pairs here.
    p = lambda v, n: list(_pair(v, n))  # noqa: E731
    return op(x, G, p(kernel_size, "kernel_size"), K, p(stride, "stride"), p(padding, "padding"),
              p(dilation, "dilation"), groups, allow_tf32)


def conv2d_direct_norm(x: torch.Tensor, G: torch.Tensor, kernel_size, K: int = 1, stride=(1, 1),
                       padding=(0, 0), dilation=(1, 1), groups: int = 1, *,
                       allow_tf32: bool = False) -> torch.Tensor:
    """`conv_norm.conv2d_direct_norm` through the custom op."""
    return _conv_call(_conv_op, x, G, kernel_size, K, stride, padding, dilation, groups, allow_tf32)


def conv2d_ghost_norm(x: torch.Tensor, G: torch.Tensor, kernel_size, K: int = 1, stride=(1, 1),
                      padding=(0, 0), dilation=(1, 1), groups: int = 1, *,
                      allow_tf32: bool = False) -> torch.Tensor:
    """`conv_norm.conv2d_ghost_norm` through the custom op."""
    return _conv_call(_conv_ghost_op, x, G, kernel_size, K, stride, padding, dilation, groups,
                      allow_tf32)


def _linear_clipped_wgrad(A: torch.Tensor, G: torch.Tensor, s: torch.Tensor, K: int = 1) -> torch.Tensor:
    return _linear_wgrad_launcher(A, G, s, K)


def _conv2d_clipped_wgrad(x: torch.Tensor, G: torch.Tensor, s: torch.Tensor,
                          kernel_size: Sequence[int], K: int, stride: Sequence[int],
                          padding: Sequence[int], dilation: Sequence[int], groups: int) -> torch.Tensor:
    return _conv_wgrad_launcher(x, G, s, tuple(kernel_size), K, tuple(stride), tuple(padding),
                                tuple(dilation), groups)


linear_clipped_wgrad = _custom_op(
    "linear_clipped_wgrad", _linear_clipped_wgrad,
    lambda A, G, s, K=1: A.new_empty((G.shape[-1], A.shape[-1]), dtype=torch.float32))
_conv_wgrad_op = _custom_op(
    "conv2d_clipped_wgrad", _conv2d_clipped_wgrad,
    lambda x, G, s, kernel_size, K, stride, padding, dilation, groups: x.new_empty(
        (G.shape[1], x.shape[1] // groups, *kernel_size), dtype=torch.float32))


def conv2d_clipped_wgrad(x: torch.Tensor, G: torch.Tensor, s: torch.Tensor, kernel_size, K: int = 1,
                         stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                         groups: int = 1) -> torch.Tensor:
    """`clipped_wgrad.conv2d_clipped_wgrad` through the custom op."""
    p = lambda v, n: list(_pair(v, n))  # noqa: E731
    return _conv_wgrad_op(x, G, s, p(kernel_size, "kernel_size"), K, p(stride, "stride"),
                          p(padding, "padding"), p(dilation, "dilation"), groups)


def _conv2d_per_sample_grads(x: torch.Tensor, G: torch.Tensor, kernel_size: Sequence[int], K: int,
                             stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                             groups: int, allow_tf32: bool = False) -> torch.Tensor:
    return _conv_psg_launcher(x, G, tuple(kernel_size), K, tuple(stride), tuple(padding), tuple(dilation),
                              groups, allow_tf32=allow_tf32)


def _fake_conv_psg(x, G, kernel_size, K, stride, padding, dilation, groups, allow_tf32=False):
    torch._check(K >= 1 and x.shape[0] % K == 0, lambda: f"{x.shape[0]} rows, multiplicity {K}")
    return x.new_empty((x.shape[0] // K, G.shape[1], x.shape[1] // groups, *kernel_size), dtype=torch.float32)


_conv_psg_op = _custom_op("conv2d_per_sample_grads", _conv2d_per_sample_grads, _fake_conv_psg)


def conv2d_per_sample_grads(x: torch.Tensor, G: torch.Tensor, kernel_size, K: int = 1, stride=(1, 1),
                            padding=(0, 0), dilation=(1, 1), groups: int = 1, *,
                            allow_tf32: bool = False) -> torch.Tensor:
    """`conv_norm.conv2d_per_sample_grads` through the custom op."""
    return _conv_call(_conv_psg_op, x, G, kernel_size, K, stride, padding, dilation, groups, allow_tf32)
