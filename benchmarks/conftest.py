"""Kernel microbenchmarks are collected only by ``pytest benchmarks/ --benchmark-only``.

A plain ``pytest`` from the repository root would otherwise pick up ``benchmarks/test_*.py`` and
spend minutes timing kernels inside the test suite.
"""
from pathlib import Path


def pytest_ignore_collect(collection_path: Path, config):
    if collection_path.name.startswith("test_") and collection_path.suffix == ".py":
        if not config.getoption("benchmark_only", default=False):
            return True
    return None
