"""torch.distributed support: each rank clips its own samples; one all-reduce of the clipped sums per
logical step; every rank then adds the same noise (keyed on seed/step/element, never on the rank), so
the noise is added exactly once and all ranks hold identical parameters."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def unwrap_ddp(module: nn.Module):
    """(inner module, the DDP wrapper or None). dpfast does the gradient all-reduce itself, so DDP's
    reducer is switched off (its hooks would see no weight gradients)."""
    ddp_cls = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    if ddp_cls is not None and isinstance(module, ddp_cls):
        module.require_backward_grad_sync = False
        return module.module, module
    return module, None


@dataclass
class DistributedContext:
    rank: int
    world_size: int
    group: object = None

    @classmethod
    def detect(cls, ddp=None):
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(),
                   group=getattr(ddp, "process_group", None))

    def all_reduce_(self, tensors: list[torch.Tensor]) -> None:
        """Sum the clipped sums over ranks with ONE collective (flattened into one buffer)."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=self.group)
        off = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[off:off + n].view_as(t))
            off += n
