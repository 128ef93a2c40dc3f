"""Locate the Triton kernels package as ``dpfast.kernels``.

In a wheel the top-level ``kernels/`` folder is installed as ``dpfast/kernels``. In a source
checkout it stays at ``<repo>/kernels``; ``load_kernels()`` then loads it under the name
``dpfast.kernels`` so that ``import dpfast.kernels.x`` works afterwards in both layouts.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["load_kernels"]

_NAME = "dpfast.kernels"


def _missing_triton(e: ImportError) -> bool:
    name = getattr(e, "name", None) or ""
    return name == "triton" or name.startswith("triton.")


@functools.lru_cache(maxsize=None)
def load_kernels() -> ModuleType | None:
    """Return the ``dpfast.kernels`` module, or ``None`` when it (or Triton) is unavailable.

    A missing Triton is not an error here: callers choose the torch backend instead. Any other
    import failure inside the kernels package is a bug and propagates.
    """
    try:
        return importlib.import_module(_NAME)  # installed wheel, or already loaded
    except ImportError as e:
        if _missing_triton(e):
            return None
        if getattr(e, "name", None) != _NAME:
            raise
    init = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not init.is_file():
        return None
    spec = importlib.util.spec_from_file_location(
        _NAME, init, submodule_search_locations=[str(init.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module  # before exec: relative imports inside the package need it
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        sys.modules.pop(_NAME, None)
        for sub in [m for m in sys.modules if m.startswith(_NAME + ".")]:
            sys.modules.pop(sub, None)
        if _missing_triton(e):
            return None
        raise
    import dpfast

    dpfast.kernels = module  # attribute access `dpfast.kernels` as after a normal import
    return module
