"""Microbenchmarks of the per-sample norm kernels in ``kernels/``, with pytest-benchmark.

    pytest benchmarks/ --benchmark-only --benchmark-group-by=group --benchmark-columns=median,iqr
    pytest benchmarks/ --benchmark-only --benchmark-json=kernels.json   # TFLOP/s in extra_info

Each case (a layer of the ddpm U-Net at B=64 on a GPU; shrunk on CPU) is timed three ways, side by
side in one benchmark group:
  kernel  the Triton kernel (GPU only)
  ref     its pure-torch reference (``*_ref``), what the torch backend costs
  wgrad   the same-shape weight-gradient call (cuBLAS GEMM / cuDNN wgrad): the cost of the
          non-private backward for this layer, the yardstick a direct norm should approach
``extra_info`` holds the FLOPs, the CUDA-event median (the harness' timer) and TFLOP/s, plus the
device, versions, dtype and commit. pytest-benchmark's own columns are wall time with a sync per call.
"""
import functools

import pytest
import torch

from benchmarks.harness import environment, time_callable

# name: (R rows, T tokens, d, p, K)                       attention projections over H*W tokens
LINEAR_CASES = {"qkv-16x16": (64, 256, 256, 256, 1), "qkv-16x16-K4": (64, 256, 256, 256, 4),
                "qkv-8x8": (64, 64, 256, 256, 1), "temb-mlp": (64, 1, 512, 512, 1)}
# name: (R, Cin, H, W, Cout, kernel, stride, padding, K)
CONV_CASES = {"3x3-32x32-c128": (64, 128, 32, 32, 128, 3, 1, 1, 1),
              "3x3-32x32-c128-K4": (64, 128, 32, 32, 128, 3, 1, 1, 4),
              "3x3-16x16-c256": (64, 256, 16, 16, 256, 3, 1, 1, 1),
              "3x3-4x4-c256": (64, 256, 4, 4, 256, 3, 1, 1, 1),
              "down-s2-32x32-c128": (64, 128, 32, 32, 128, 3, 2, 1, 1),
              "nin-1x1-16x16-c256": (64, 256, 16, 16, 256, 1, 1, 0, 1)}
# ghost norms pay off where T is small: the low-resolution levels
CONV_GHOST_CASES = {"3x3-4x4-c256": (64, 256, 4, 4, 256, 3, 1, 1, 1),
                    "3x3-8x8-c256": (64, 256, 8, 8, 256, 3, 1, 1, 1)}
GHOST_CASES = {"qkv-4x4": (64, 16, 256, 256, 1), "qkv-8x8": (64, 64, 256, 256, 1),
               "qkv-16x16": (64, 256, 256, 256, 1)}
IMPLS = ("kernel", "ref", "wgrad")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _shrink(n, device, floor=4):
    """CPU runs the same cases at 1/8 of the rows and channels: a smoke test of the benchmark."""
    return n if device.type == "cuda" else max(floor, n // 8)


@functools.lru_cache(maxsize=None)
def _env(device_type):
    return environment(torch.device(device_type))


def _kernels(name):
    """The kernel module ``kernels.<name>``, or a skip that says why it is missing."""
    try:
        import kernels
    except ImportError as e:
        pytest.skip(f"kernels package not importable: {e}")
    if not getattr(kernels, "HAS_TRITON", False):
        pytest.skip(f"kernels need Triton: {getattr(kernels, 'TRITON_IMPORT_ERROR', '')}")
    return pytest.importorskip(f"kernels.{name}")


def _check(impl, dtype, device):
    if dtype != torch.float32 and device.type != "cuda":
        pytest.skip("low-precision cases run on a GPU only")
    if impl == "kernel" and device.type != "cuda":
        pytest.skip("Triton kernels are benchmarked on a GPU (the interpreter is not a benchmark)")


def _run(benchmark, fn, flops, group, impl, dtype_name, device):
    benchmark.group = group
    rounds = 20 if device.type == "cuda" else 5  # CPU is a smoke run of the benchmark itself
    ms = time_callable(fn, device, warmup=3, steps=rounds)  # warm-up also runs Triton's autotuner
    benchmark.extra_info.update(impl=impl, dtype=dtype_name, flops=flops, ms=round(ms, 5),
                                tflops=round(flops / ms / 1e9, 3), **_env(device.type))

    def call():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)


def _linear_inputs(case, dtype, device):
    R, T, d, p, K = case
    R, d, p = _shrink(R, device, floor=2 * K), _shrink(d, device), _shrink(p, device)
    gen = torch.Generator(device=device).manual_seed(0)
    A = torch.randn(R, T, d, device=device, dtype=dtype, generator=gen)
    G = torch.randn(R, T, p, device=device, dtype=dtype, generator=gen)
    return A, G, K


def _linear_wgrad(A, G):
    # grad_W of a Linear layer over all rows: G^T A, (p, d), one GEMM
    return lambda: G.reshape(-1, G.shape[-1]).T @ A.reshape(-1, A.shape[-1])


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_direct_norm(benchmark, case, impl, dtype_name):
    device, dtype = _device(), DTYPES[dtype_name]
    _check(impl, dtype, device)
    A, G, K = _linear_inputs(LINEAR_CASES[case], dtype, device)
    (R, T, d), p = A.shape, G.shape[-1]
    if impl == "wgrad":
        fn = _linear_wgrad(A, G)
    else:
        mod = _kernels("linear_norm")
        op = mod.linear_direct_norm if impl == "kernel" else mod.linear_direct_norm_ref
        fn = functools.partial(op, A, G, K)
    _run(benchmark, fn, 2.0 * R * T * d * p, f"linear_direct_norm {case} {dtype_name}", impl,
         dtype_name, device)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(GHOST_CASES))
def test_ghost_norm(benchmark, case, impl, dtype_name):
    device, dtype = _device(), DTYPES[dtype_name]
    _check(impl, dtype, device)
    A, G, K = _linear_inputs(GHOST_CASES[case], dtype, device)
    (R, T, d), p = A.shape, G.shape[-1]
    if impl == "wgrad":
        fn, flops = _linear_wgrad(A, G), 2.0 * R * T * d * p
    else:
        mod = _kernels("ghost_norm")
        op = mod.ghost_norm if impl == "kernel" else mod.ghost_norm_ref
        fn = functools.partial(op, A, G, K)
        flops = 2.0 * (R // K) * (K * T) ** 2 * (d + p) / 2  # upper-triangle Grams
    _run(benchmark, fn, flops, f"ghost_norm {case} {dtype_name}", impl, dtype_name, device)


def _conv_inputs(case, dtype, device):
    R, cin, H, W, cout, k, s, pad, K = case
    R, cin, cout = _shrink(R, device, floor=2 * K), _shrink(cin, device), _shrink(cout, device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(R, cin, H, W, device=device, dtype=dtype, generator=gen)
    Ho, Wo = (H + 2 * pad - k) // s + 1, (W + 2 * pad - k) // s + 1
    G = torch.randn(R, cout, Ho, Wo, device=device, dtype=dtype, generator=gen)
    return x, G, (k, s, pad, K)


def _conv_wgrad(x, G, k, s, pad):
    weight = torch.empty(G.shape[1], x.shape[1], k, k, device=x.device, dtype=x.dtype)
    # The cuDNN weight-gradient call the non-private backward makes for this conv.
    return lambda: torch.ops.aten.convolution_backward(
        G, x, weight, None, [s, s], [pad, pad], [1, 1], False, [0, 0], 1, [False, True, False])


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_direct_norm(benchmark, case, impl, dtype_name):
    device, dtype = _device(), DTYPES[dtype_name]
    _check(impl, dtype, device)
    x, G, (k, s, pad, K) = _conv_inputs(CONV_CASES[case], dtype, device)
    (R, cin), (cout, Ho, Wo) = x.shape[:2], G.shape[1:]
    flops = 2.0 * R * Ho * Wo * cin * k * k * cout
    if impl == "wgrad":
        fn = _conv_wgrad(x, G, k, s, pad)
    else:
        mod = _kernels("conv_norm")
        op = mod.conv2d_direct_norm if impl == "kernel" else mod.conv2d_direct_norm_ref
        fn = functools.partial(op, x, G, k, K, stride=(s, s), padding=(pad, pad))
    _run(benchmark, fn, flops, f"conv2d_direct_norm {case} {dtype_name}", impl, dtype_name, device)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CONV_GHOST_CASES))
def test_conv2d_ghost_norm(benchmark, case, impl, dtype_name):
    device, dtype = _device(), DTYPES[dtype_name]
    _check(impl, dtype, device)
    x, G, (k, s, pad, K) = _conv_inputs(CONV_GHOST_CASES[case], dtype, device)
    (R, cin), (cout, Ho, Wo) = x.shape[:2], G.shape[1:]
    if impl == "wgrad":
        fn, flops = _conv_wgrad(x, G, k, s, pad), 2.0 * R * Ho * Wo * cin * k * k * cout
    else:
        mod = _kernels("conv_norm")
        op = mod.conv2d_ghost_norm if impl == "kernel" else mod.conv2d_ghost_norm_ref
        fn = functools.partial(op, x, G, k, K, stride=(s, s), padding=(pad, pad))
        flops = 2.0 * (R // K) * (K * Ho * Wo) ** 2 * (cin * k * k + cout) / 2  # upper triangle
    _run(benchmark, fn, flops, f"conv2d_ghost_norm {case} {dtype_name}", impl, dtype_name, device)


# The fused clipped weight gradient (bf16/fp16 only) against what the torch backend does for the
# same sum in fp32 ("ref": s*G and the weight-gradient call upcast to fp32, TF32 off) and against the
# non-private bf16 weight gradient ("wgrad"), on the layers of the ddpm U-Net.
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["3x3-32x32-c128", "3x3-16x16-c256", "down-s2-32x32-c128"])
def test_conv2d_clipped_wgrad(benchmark, case, impl):
    device, dtype = _device(), torch.bfloat16
    _check(impl, dtype, device)
    x, G, (k, s, pad, K) = _conv_inputs(CONV_CASES[case], dtype, device)
    (R, cin), (cout, Ho, Wo) = x.shape[:2], G.shape[1:]
    scale = torch.rand(R, device=device)
    if impl == "wgrad":
        fn = _conv_wgrad(x, G, k, s, pad)
    elif impl == "kernel":
        mod = _kernels("clipped_wgrad")
        fn = functools.partial(mod.conv2d_clipped_wgrad, x, G, scale, k, stride=(s, s), padding=(pad, pad))
    else:
        from dpfast._precision import exact_fp32
        from dpfast.rules.base import scale_rows

        def fn():
            with exact_fp32():
                return _conv_wgrad(x.float(), scale_rows(G, scale), k, s, pad)()
    _run(benchmark, fn, 2.0 * R * Ho * Wo * cin * k * k * cout, f"conv2d_clipped_wgrad {case} bf16",
         impl, "bf16", device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["qkv-16x16", "qkv-8x8"])
def test_linear_clipped_wgrad(benchmark, case, impl):
    device, dtype = _device(), torch.bfloat16
    _check(impl, dtype, device)
    A, G, K = _linear_inputs(LINEAR_CASES[case], dtype, device)
    (R, T, d), p = A.shape, G.shape[-1]
    scale = torch.rand(R, device=device)
    if impl == "wgrad":
        fn = _linear_wgrad(A, G)
    elif impl == "kernel":
        fn = functools.partial(_kernels("clipped_wgrad").linear_clipped_wgrad, A, G, scale)
    else:
        from dpfast._precision import exact_fp32
        from dpfast.rules.base import scale_rows

        def fn():
            with exact_fp32():
                return _linear_wgrad(A.float(), scale_rows(G, scale))()
    _run(benchmark, fn, 2.0 * R * T * d * p, f"linear_clipped_wgrad {case} bf16", impl, "bf16",
         device)
