"""Kernel tests run on a GPU natively and on CPU through the Triton interpreter.

Each test module starts with `pytest.importorskip("triton")`, so without Triton they are all
skipped with that reason (a conftest cannot skip a directory while it is being imported).
"""
import os
import sys
from pathlib import Path

import pytest
import torch

# The kernel tests import the kernels as `kernels_under_test`, an alias of dpfast.kernels (the installed
# wheel's copy, or the source tree's when run from a checkout) so the kernels tested are the ones
# the engine uses. Only tests/ goes on sys.path (for tests/helpers.py): putting the repository root
# there would shadow the installed dpfast with the uncompiled source tree.
_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

from dpfast._kernels import load_kernels  # noqa: E402

_k = load_kernels()
if _k is not None:
    # not under the short name `kernels`: that is also Hugging Face's kernels package, which diffusers and
    # transformers import when it is installed (transformers >= 5.25 pulls it in), and an alias there
    # broke every diffusers test run after these
    sys.modules.setdefault("kernels_under_test", _k)
    for _name in ("linear_norm", "ghost_norm", "conv_norm", "clipped_wgrad", "ops"):
        try:
            sys.modules.setdefault(f"kernels_under_test.{_name}", importlib.import_module(f"{_k.__name__}.{_name}"))
        except ImportError:  # no Triton: the test modules skip themselves
            pass


def pytest_configure(config):
    # Triton picks interpreter-or-compiler when a kernel is decorated, so this must run before
    # any test module imports `kernels`.  (is_available() does not create a CUDA context.)
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device():
    """Where kernel inputs live: the GPU if there is one, else CPU under the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"
