"""dpfast: fast, exact DP-SGD for diffusion models.

    from dpfast import PrivacyEngine
    engine = PrivacyEngine(accountant="prv")
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                   noise_multiplier=1.1, max_grad_norm=1.0)

Importing dpfast never initialises CUDA and works without the compiled extension (dpfast._C) or Triton.
"""
__version__ = "0.1.0"

from .engine import PrivacyEngine
from .errors import (BatchLayoutError, DPError, NonFiniteGradientError, PrivacyLeakError,
                     UnsupportedModuleError)
from .data import expand_rows
from .fix import fix_module
from . import ledger
from .optimizer import DPOptimizer
from .private_module import check_module, remove_private

__all__ = ["PrivacyEngine", "DPOptimizer", "expand_rows", "fix_module", "ledger", "check_module", "remove_private", "DPError",
           "UnsupportedModuleError", "NonFiniteGradientError", "PrivacyLeakError", "BatchLayoutError",
           "__version__"]
