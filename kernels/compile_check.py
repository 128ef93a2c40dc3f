"""Compile every norm kernel for a real CUDA architecture, ahead of time, without a GPU.

CI runs the kernels through Triton's interpreter, which accepts programs that the GPU compiler
rejects (block shapes `tl.dot` cannot take, shared memory beyond the chip, register spills). This
tool lowers each kernel with each autotuning config, for each input dtype and for launch
signatures taken from real U-Net layers, through Triton's full pipeline to PTX and a cubin
(`ptxas`, bundled with Triton), and reads back what the chip would be asked for:

    dpfast check-kernels                        # sm_90 (H100/H200), every config
    dpfast check-kernels --arch 80 --arch 90 --json report.json
    dpfast check-kernels --quick                # what CI runs (about a minute)
    python -m dpfast.kernels.compile_check ...  # the same (python -m kernels.compile_check in a checkout)

A row fails when the kernel does not compile, needs more shared memory than the architecture has,
spills registers to local memory, or (bf16/fp16/tf32) does not use tensor-core instructions
(`wgmma` on sm_90, `mma` before).  The exit status is 1 if any row fails.  TRITON_INTERPRET must
be unset: interpreted kernels cannot be compiled.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import HAS_TRITON, INTERPRET, TRITON_IMPORT_ERROR

# Dynamic shared memory a block may opt into, bytes (CUDA programming guide, compute capabilities).
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
# kernels that take only some input precisions (the fused clipped gradients: bf16/fp16)
_KERNEL_PRECISIONS = {"linear_clipped_wgrad": ("bf16", "fp16"),
                      "conv2d_clipped_wgrad": ("bf16", "fp16")}
_INTERPRETED = ("TRITON_INTERPRET=1 is set: interpreted kernels cannot be compiled; run it again "
                "with TRITON_INTERPRET unset")
# (dtype, PRECISION) pairs the launchers can produce: fp32 is "ieee" unless allow_tf32.
PRECISIONS = {"fp32": (torch.float32, "ieee"), "tf32": (torch.float32, "tf32"),
              "bf16": (torch.bfloat16, "ieee"), "fp16": (torch.float16, "ieee")}


@dataclasses.dataclass
class Row:
    kernel: str
    case: str
    precision: str
    config: str
    arch: int
    ok: bool = False
    shared_bytes: int | None = None
    registers: int | None = None
    local_bytes: int | None = None
    mma: str | None = None  # "wgmma", "mma" or "none"
    seconds: float = 0.0
    problem: str = ""


def _cases():
    """(kernel name, (autotuned kernel, its TuningSpace), case name,
    build(dtype) -> (args, constexpr kwargs)).

    The shapes are those of the ddpm U-Net's layers (aligned, K=1 and K=4) and an odd one
    (sizes not divisible by 16, strided operands, K=3): Triton specialises a launch on which
    integers are 1 or divisible by 16, so both kinds of signature are compiled."""
    from .conv_norm import CONV_GHOST_SPACE, CONV_SPACE
    from .conv_norm import _conv2d_direct_norm_kernel as conv_k
    from .conv_norm import _conv2d_ghost_norm_kernel as conv_ghost_k
    from .conv_norm import _conv2d_per_sample_grads_kernel as conv_psg_k
    from .ghost_norm import GHOST_SPACE
    from .ghost_norm import _ghost_norm_kernel as ghost_k
    from .linear_norm import LINEAR_SPACE
    from .linear_norm import _linear_direct_norm_kernel as linear_k

    from .clipped_wgrad import _conv2d_clipped_wgrad_kernel as conv_wgrad_k
    from .clipped_wgrad import _linear_clipped_wgrad_kernel as linear_wgrad_k

    linear_k, ghost_k = (linear_k, LINEAR_SPACE), (ghost_k, GHOST_SPACE)
    from .clipped_wgrad import CONV_WGRAD_SPACE, LINEAR_WGRAD_SPACE

    linear_wgrad_k = (linear_wgrad_k, LINEAR_WGRAD_SPACE)
    conv_wgrad_k = (conv_wgrad_k, CONV_WGRAD_SPACE)
    conv_k, conv_ghost_k = (conv_k, CONV_SPACE), (conv_ghost_k, CONV_GHOST_SPACE)
    conv_psg_k = (conv_psg_k, CONV_SPACE)

    def tokens(R, T, d, p, K, strided=False):
        def build(dtype):
            A = torch.empty(R, T, d + 2 if strided else d, dtype=dtype)[..., :d]
            G = torch.empty(R, T, p, dtype=dtype)
            if strided:
                G = torch.empty(R, p, T, dtype=dtype).transpose(1, 2)
            part = torch.empty(R // K, 64)
            return (A, G, part, K * T, T, d, p, K, 64, *A.stride(), *G.stride()), {}
        return build

    def conv(R, Cin, H, W, Cout, k, s, pd, dl, groups, K, channels_last):
        def build(dtype):
            Ho = (H + 2 * pd - dl * (k - 1) - 1) // s + 1
            x = torch.empty(R, Cin, H, W, dtype=dtype)
            G = torch.empty(R, Cout, Ho, Ho, dtype=dtype)
            if channels_last:
                x, G = (t.to(memory_format=torch.channels_last) for t in (x, G))
            cin_g, cout_g = Cin // groups, Cout // groups
            part = torch.empty(R // K, 64)
            args = (x, G, part, K * Ho * Ho, Ho * Ho, Ho, H, W, K, groups, cin_g, cout_g,
                    cin_g * k * k, 64, *x.stride(), *G.stride())
            geo = dict(KH=k, KW=k, SH=s, SW=s, PH=pd, PW=pd, DH=dl, DW=dl,
                       CIN_INNER=channels_last and Cin > 1)
            return args, geo
        return build

    def wgrad(build):
        """The clipped-gradient kernels take (x, G, S, part, B, n_red, ..., K, ..., per_split,
        strides) where the norm kernels take (x, G, part, n_red, ..., K, ..., n_slots, strides)."""
        def built(dtype):
            args, geo = build(dtype)
            (x, G, part), n_red = args[:3], args[3]
            if geo:  # conv: n_red, L, Wo, H, W, K, groups, cin_g, cout_g, J, n_slots, strides
                K = args[8]
                rest = (*args[4:8], K, *args[9:13], 4, *args[14:])
            else:  # linear: n_red, T, d, p, K, n_slots, strides
                K = args[7]
                rest = (*args[4:7], K, 4, *args[9:])
            B = x.shape[0] // K
            return (x, G, torch.empty(B), part, B, n_red, *rest), geo
        return built

    def psg(build):
        """The per-sample-gradient kernel takes (x, G, out, n_red, ..., J, strides, out's sample
        stride) where the direct norm takes (x, G, part, n_red, ..., J, n_slots, strides)."""
        def built(dtype):
            args, geo = build(dtype)
            x, G, K, J = args[0], args[1], args[8], args[12]
            out = torch.empty(x.shape[0] // K, G.shape[1], J)
            return (x, G, out, *args[3:13], *args[14:], G.shape[1] * J), geo
        return built

    return [
        ("conv2d_per_sample_grads", conv_psg_k, "3x3-16x16-c128", psg(conv(64, 128, 16, 16, 128, 3, 1, 1, 1, 1, 1, False))),
        ("conv2d_per_sample_grads", conv_psg_k, "3x3-8x8-c256-nhwc-K4", psg(conv(64, 256, 8, 8, 256, 3, 1, 1, 1, 1, 4, True))),
        ("conv2d_per_sample_grads", conv_psg_k, "odd-d2-g2-K3", psg(conv(6, 6, 9, 9, 10, 3, 1, 2, 2, 2, 3, False))),
        ("linear_clipped_wgrad", linear_wgrad_k, "qkv-16x16", wgrad(tokens(64, 256, 256, 256, 1))),
        ("linear_clipped_wgrad", linear_wgrad_k, "odd-strided-K3", wgrad(tokens(12, 49, 33, 35, 3, True))),
        ("conv2d_clipped_wgrad", conv_wgrad_k, "3x3-32x32-c128", wgrad(conv(64, 128, 32, 32, 128, 3, 1, 1, 1, 1, 1, False))),
        ("conv2d_clipped_wgrad", conv_wgrad_k, "3x3-16x16-c256-nhwc-K4", wgrad(conv(64, 256, 16, 16, 256, 3, 1, 1, 1, 1, 4, True))),
        ("conv2d_clipped_wgrad", conv_wgrad_k, "odd-d2-g2-K3", wgrad(conv(6, 6, 9, 9, 10, 3, 1, 2, 2, 2, 3, False))),
        ("linear_direct_norm", linear_k, "qkv-16x16", tokens(64, 256, 256, 256, 1)),
        ("linear_direct_norm", linear_k, "qkv-16x16-K4", tokens(64, 256, 256, 256, 4)),
        ("linear_direct_norm", linear_k, "odd-strided-K3", tokens(12, 49, 33, 35, 3, True)),
        ("ghost_norm", ghost_k, "qkv-4x4", tokens(64, 16, 256, 256, 1)),
        ("ghost_norm", ghost_k, "odd-strided-K3", tokens(12, 49, 33, 35, 3, True)),
        ("conv2d_direct_norm", conv_k, "3x3-32x32-c128", conv(64, 128, 32, 32, 128, 3, 1, 1, 1, 1, 1, False)),
        ("conv2d_direct_norm", conv_k, "3x3-32x32-c128-nhwc", conv(64, 128, 32, 32, 128, 3, 1, 1, 1, 1, 1, True)),
        ("conv2d_direct_norm", conv_k, "down-s2-c128-K4", conv(64, 128, 32, 32, 128, 3, 2, 1, 1, 1, 4, False)),
        ("conv2d_direct_norm", conv_k, "nin-1x1-c256-nhwc", conv(64, 256, 16, 16, 256, 1, 1, 0, 1, 1, 1, True)),
        ("conv2d_direct_norm", conv_k, "odd-d2-g2-K3", conv(6, 6, 9, 9, 10, 3, 1, 2, 2, 2, 3, False)),
        ("conv2d_ghost_norm", conv_ghost_k, "3x3-4x4-c256", conv(64, 256, 4, 4, 256, 3, 1, 1, 1, 1, 1, False)),
        ("conv2d_ghost_norm", conv_ghost_k, "3x3-8x8-c256-nhwc", conv(64, 256, 8, 8, 256, 3, 1, 1, 1, 1, 1, True)),
        ("conv2d_ghost_norm", conv_ghost_k, "odd-d2-g2-K3", conv(6, 6, 9, 9, 10, 3, 1, 2, 2, 2, 3, False)),
    ]


def _config_kwargs(cfg) -> dict:
    kw = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if getattr(cfg, "num_ctas", 1) not in (None, 1):
        kw["num_ctas"] = cfg.num_ctas
    return kw


def _config_name(cfg) -> str:
    blocks = "x".join(str(v) for v in cfg.kwargs.values())
    return f"{blocks} w{cfg.num_warps} s{cfg.num_stages}"


def _cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.is_file() else "cuobjdump"


def _resources(cubin: bytes) -> dict:
    """REG / LOCAL / STACK of the one kernel in `cubin`, from `cuobjdump --dump-resource-usage`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|LOCAL|STACK):(\d+)", out)}


def _mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "none"


def compile_one(jit_fn, args, kwargs, arch: int):
    """Lower one launch of `jit_fn` (a @triton.jit function) for sm_`arch`, as the JIT would for
    these arguments (same specialisation), without a driver.  Returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    try:
        from triton.runtime.jit import create_function_from_signature
    except ImportError as e:  # the binder moved: say which Triton this was written against
        raise RuntimeError(f"compile_check needs Triton >= 3.4's JIT binder ({e}); "
                           f"this is Triton {triton.__version__}") from e
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit_fn._pack_args(backend, kwargs, bound,
                                                              specialization, options)
    return triton.compile(ASTSource(jit_fn, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def check(arches=(90,), quick=False, progress=None, kernels=None) -> list[Row]:
    """Compile the kernels; one Row per (kernel, case, precision, config, arch).

    quick: every config of both families (tensor-core, FMA) for the first case of each kernel;
    the other cases with the first config of each precision.  The full sweep compiles every
    (case, precision, config) the autotuner could launch."""
    if not HAS_TRITON:
        raise RuntimeError(f"compile_check needs Triton: {TRITON_IMPORT_ERROR}")
    if INTERPRET:
        raise RuntimeError(_INTERPRETED)
    jobs, first_case = [], {}
    for name, (kernel, space), case, build in _cases():
        if kernels and name not in kernels:
            continue
        first = first_case.setdefault(name, case) == case
        for prec, (dtype, precision) in PRECISIONS.items():
            if prec not in _KERNEL_PRECISIONS.get(name, PRECISIONS):
                continue
            for ci, cfg in enumerate(space.family(dtype, precision)):
                if quick and ci > 0 and not (first and prec in ("bf16", "fp32")):
                    continue
                for arch in arches:
                    jobs.append((name, kernel, case, build, prec, cfg, arch))
    rows = []
    for n, (name, kernel, case, build, prec, cfg, arch) in enumerate(jobs):
        dtype, precision = PRECISIONS[prec]
        row = Row(name, case, prec, _config_name(cfg), arch)
        t0 = time.perf_counter()
        try:
            args, geo = build(dtype)
            ck = compile_one(kernel.fn, args, {**geo, **_config_kwargs(cfg), "PRECISION": precision},
                             arch)
            res = _resources(ck.asm["cubin"])
            row.shared_bytes = int(ck.metadata.shared)
            row.registers = res.get("REG")
            row.local_bytes = res.get("LOCAL", 0) + res.get("STACK", 0)
            row.mma = _mma_kind(ck.asm["ptx"])
            row.ok, row.problem = _verdict(row, arch, prec)
        except Exception as e:  # a compile error is a result of this tool, not a crash of it
            row.problem = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        row.seconds = round(time.perf_counter() - t0, 2)
        rows.append(row)
        if progress:
            progress(n + 1, len(jobs), row)
    return rows


def _verdict(row: Row, arch: int, prec: str) -> tuple[bool, str]:
    problems = []
    limit = SMEM_LIMIT.get(arch)
    if limit is not None and row.shared_bytes > limit:
        problems.append(f"shared memory {row.shared_bytes} B > {limit} B")
    if row.local_bytes:
        problems.append(f"{row.local_bytes} B of local memory (register spills)")
    want = "wgmma" if arch >= 90 else "mma"
    if prec != "fp32" and row.mma == "none":
        problems.append(f"{prec} tl.dot did not lower to tensor-core instructions ({want})")
    return not problems, "; ".join(problems)


def format_table(rows: list[Row]) -> str:
    head = "| kernel | case | precision | config | sm | ok | smem KiB | regs | spill B | mma | s | problem |"
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        smem = "" if r.shared_bytes is None else f"{r.shared_bytes / 1024:.0f}"
        lines.append(f"| {r.kernel} | {r.case} | {r.precision} | {r.config} | {r.arch} | "
                     f"{'yes' if r.ok else 'NO'} | {smem} | {r.registers or ''} | "
                     f"{'' if r.local_bytes is None else r.local_bytes} | {r.mma or ''} | "
                     f"{r.seconds} | {r.problem} |")
    return "\n".join(lines)


def main(argv=None, prog="python -m dpfast.kernels.compile_check") -> int:
    ap = argparse.ArgumentParser(prog=prog,
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, action="append",
                    help="compute capability x10 (90 = H100/H200, 80 = A100); repeatable; default 90")
    ap.add_argument("--quick", action="store_true",
                    help="every config for one case per kernel, the first config elsewhere")
    ap.add_argument("--kernel", action="append", metavar="NAME",
                    help="only this kernel (e.g. conv2d_direct_norm); repeatable; default all")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    a = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset

    if INTERPRET or not HAS_TRITON:
        why = (_INTERPRETED if INTERPRET else f"compile_check needs Triton: {TRITON_IMPORT_ERROR}")
        print(f"error: {why}", file=sys.stderr)
        return 2
    from tqdm.auto import tqdm

    bar = tqdm(desc="compiling", unit="kernel", file=sys.stderr)

    def progress(i, n, row):
        bar.total = n
        bar.set_postfix_str(f"{row.kernel} {row.case} {row.precision} sm_{row.arch}")
        bar.update(1)
    try:
        rows = check(tuple(a.arch or [90]), quick=a.quick, progress=progress, kernels=a.kernel)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    print(format_table(rows))
    if a.json:
        a.json.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    bad = [r for r in rows if not r.ok]
    import triton

    print(f"\n{len(rows) - len(bad)}/{len(rows)} compiled clean (Triton {triton.__version__}, "
          f"torch {torch.__version__})", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
