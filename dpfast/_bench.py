"""Locate the benchmark harness: ``dpfast.benchmarks`` in an installed wheel, ``benchmarks/`` beside
``dpfast/`` in a source checkout (loaded under the name dpfast.benchmarks so relative imports work)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


def load_benchmarks():
    try:
        return importlib.import_module("dpfast.benchmarks")
    except ImportError:
        pass
    init = Path(__file__).resolve().parent.parent / "benchmarks" / "__init__.py"
    if not init.exists():
        raise ImportError("dpfast's benchmark harness is not installed (dpfast.benchmarks) and no source "
                          "checkout is beside this dpfast")
    spec = importlib.util.spec_from_file_location("dpfast.benchmarks", init,
                                                  submodule_search_locations=[str(init.parent)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["dpfast.benchmarks"] = mod
    spec.loader.exec_module(mod)
    return mod
