"""`import dpfast` must be cheap and CPU-safe: no CUDA initialisation, no heavy optional modules.

Each check runs in a fresh interpreter (this pytest process has imported plenty already); each
start costs seconds (torch), so the checks are grouped into two interpreters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Optional or slow-to-import modules that `import dpfast` must not pull in eagerly.
HEAVY = ["triton", "matplotlib", "diffusers", "opacus", "scipy", "prv_accountant", "pandas"]

_PROBE = """
import json, sys, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
{body}
import torch
print(json.dumps({{
    "cuda_initialized": torch.cuda.is_initialized(),
    "heavy": sorted(m for m in {heavy!r} if m in sys.modules),
    "ext_warnings": [str(w.message) for w in caught if "dpfast._C" in str(w.message)],
}}))
"""


def _probe(body: str) -> dict:
    """Run `body` in a fresh interpreter on a CPU-only view of the machine; report what it did."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    code = _PROBE.format(body=textwrap.indent(textwrap.dedent(body), "    "), heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_dpfast_is_lean():
    result = _probe("""
        import dpfast
        import dpfast._ext, dpfast._kernels, dpfast.finalize, dpfast.random
    """)
    assert result["cuda_initialized"] is False
    assert result["heavy"] == [], f"`import dpfast` imported {result['heavy']}; import them lazily"
    assert len(result["ext_warnings"]) <= 1  # a missing extension is reported once, not per import


def test_fallbacks_without_extension_or_triton():
    # Hide dpfast._C and Triton: the reference finalize must still work after exactly one warning,
    # require_ext() must say how to build, and loading the kernels package must give
    # dpfast.kernels (reporting no Triton) or None -- never an ImportError.
    result = _probe("""
        sys.modules["dpfast._C"] = None
        sys.modules["triton"] = None
        import torch
        import dpfast._ext
        import dpfast.finalize as F
        from dpfast._kernels import load_kernels

        k = load_kernels()
        assert k is None or (k.__name__ == "dpfast.kernels" and not getattr(k, "HAS_TRITON", False))
        a = torch.ones(5)
        F.finalize_([a], [a], noise_std=1.0, scale=0.5, seed=1, step=2)
        assert dpfast._ext.ext is None
        try:
            dpfast._ext.require_ext()
        except RuntimeError as e:
            assert "pip install" in str(e)
        else:
            raise AssertionError("require_ext() did not raise")
    """)
    assert result["cuda_initialized"] is False
    assert len(result["ext_warnings"]) == 1
