"""The kernels as the GPU compiler sees them, on a machine without a GPU.

* `torch.compile` traces through the custom ops (their fake implementations) with no graph break.
* `compile_check --quick` lowers every kernel, config and input dtype for sm_90 through Triton's
  real pipeline (PTX and a cubin by ptxas, which the interpreter never runs): each compiles, fits
  the chip's shared memory, does not spill, and bf16/fp16/tf32 use tensor cores (wgmma or mma).
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from kernels_under_test import ops  # noqa: E402


def test_custom_ops_trace_without_graph_breaks(device):
    g = torch.Generator().manual_seed(0)
    A, G = (torch.randn(4, 5, 6, generator=g).to(device) for _ in range(2))
    x = torch.randn(4, 3, 6, 6, generator=g).to(device)
    Gc = torch.randn(4, 2, 3, 3, generator=g).to(device)

    def norms(A, G, x, Gc):
        # ops between the kernels, so the graph is not a single opaque call
        lin = ops.linear_direct_norm(A * 2, G, 2) + ops.ghost_norm(A, G.relu(), 2)
        conv = (ops.conv2d_direct_norm(x, Gc, 3, 2, stride=2, padding=1)
                + ops.conv2d_ghost_norm(x, Gc, (3, 3), 2, 2, 1))
        return (lin + conv).sqrt()

    torch._dynamo.reset()
    compiled = torch.compile(norms, fullgraph=True, backend="aot_eager")  # fullgraph: break = error
    torch.testing.assert_close(compiled(A, G, x, Gc), norms(A, G, x, Gc))


def test_every_kernel_compiles_for_sm90(tmp_path):
    report = tmp_path / "report.json"
    script = ("import importlib, sys; from dpfast._kernels import load_kernels; "
              "k = load_kernels(); cc = importlib.import_module(k.__name__ + '.compile_check'); "
              f"sys.exit(cc.main(['--quick', '--arch', '90', '--json', {str(report)!r}]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=900)
    if not report.exists():
        pytest.fail(f"compile_check did not run (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    rows = json.loads(report.read_text())
    bad = [f"{r['kernel']} {r['case']} {r['precision']} {r['config']}: {r['problem']}"
           for r in rows if not r["ok"]]
    assert not bad, "\n".join(bad)
    assert proc.returncode == 0, proc.stderr[-4000:]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"linear_direct_norm", "ghost_norm", "conv2d_direct_norm",
                       "conv2d_ghost_norm", "linear_clipped_wgrad", "conv2d_clipped_wgrad",
                       "conv2d_per_sample_grads"}
    for k in kernels:  # Hopper's warpgroup MMA: the 64-row tiles of every kernel use it
        assert any(r["mma"] == "wgmma" for r in rows if r["kernel"] == k and r["precision"] == "bf16"), k
