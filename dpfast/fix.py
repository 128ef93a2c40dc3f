"""fix_module: make a model private-ready by swapping layers that mix samples for ones that do not."""
from __future__ import annotations

from torch import nn


def _groups_for(channels: int, max_groups: int = 32) -> int:
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def fix_module(module: nn.Module, max_groups: int = 32) -> nn.Module:
    """Replace every BatchNorm (which normalises across the batch) by a GroupNorm over the same channels
    (the largest group count <= ``max_groups`` dividing them), in place; returns the module (a new
    GroupNorm if ``module`` itself is a BatchNorm). Fine-tuned weights do not transfer: retrain.

    InstanceNorm layers that track running statistics (a data-dependent buffer released as it is) are
    switched to per-sample statistics in training and eval alike (track_running_stats=False)."""
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)):
        return nn.GroupNorm(_groups_for(module.num_features, max_groups), module.num_features,
                            eps=module.eps, affine=module.affine)
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
        module.track_running_stats = False
        module.running_mean = module.running_var = module.num_batches_tracked = None
        return module
    for name, child in list(module.named_children()):
        fixed = fix_module(child, max_groups)
        if fixed is not child:
            setattr(module, name, fixed)
    return module
