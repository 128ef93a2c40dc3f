"""Guarded import of the compiled extension ``dpfast._C``.

``ext`` is the module, or ``None`` when it was not built (e.g. a source checkout used through
PYTHONPATH). Callers fall back to the pure PyTorch references in that case; ``require_ext()`` is
for paths that have no fallback. Importing this module never touches ``torch.cuda``.
"""

from __future__ import annotations

import warnings
from types import ModuleType

__all__ = ["ext", "import_error", "has_cuda_ext", "require_ext"]

_BUILD_HINT = (
    "Build it with `pip install .` (add `--no-build-isolation` offline), or for a source "
    "checkout: `cmake -S . -B build -G Ninja -Dpybind11_DIR=$(python -m pybind11 --cmakedir) && "
    "cmake --build build && cp build/_C*.so dpfast/`."
)

ext: ModuleType | None
import_error: ImportError | None
try:
    from dpfast import _C as ext  # type: ignore[attr-defined]

    import_error = None
except ImportError as e:  # not built, or built for another Python
    ext = None
    import_error = e
    # Module-level code runs once per process, so this is the one warning.
    warnings.warn(
        f"dpfast._C is not available ({e}); using the slower pure PyTorch reference kernels. "
        + _BUILD_HINT,
        RuntimeWarning,
        stacklevel=2,
    )


def has_cuda_ext() -> bool:
    """True when ``dpfast._C`` was built with its CUDA kernels."""
    return ext is not None and bool(getattr(ext, "has_cuda", False))


def require_ext(cuda: bool = False) -> ModuleType:
    """Return ``dpfast._C`` or raise an actionable RuntimeError (with ``cuda``: its CUDA part)."""
    if ext is None:
        raise RuntimeError(
            f"dpfast._C is required here but could not be imported ({import_error}). " + _BUILD_HINT
        ) from import_error
    if cuda and not has_cuda_ext():
        raise RuntimeError(
            "dpfast._C was built without CUDA kernels (no nvcc at build time, or "
            "DPFAST_SKIP_CUDA_BUILD=1). Rebuild on a machine with the CUDA toolkit; choose GPU "
            "architectures with DPFAST_CUDA_ARCHS (default '80;90')."
        )
    return ext
