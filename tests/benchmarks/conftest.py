# The harness ships in the wheel as dpfast.benchmarks (and lives in benchmarks/ in a checkout).
# Alias it to the short name the tests use, without putting the repository root on sys.path (that
# would shadow the installed dpfast with the uncompiled source tree).
import importlib
import sys

from dpfast._bench import load_benchmarks

_b = load_benchmarks()
sys.modules.setdefault("benchmarks", _b)
for _name in ("engines", "harness", "report", "cli", "models", "utility"):
    sys.modules.setdefault(f"benchmarks.{_name}", importlib.import_module(f"{_b.__name__}.{_name}"))
