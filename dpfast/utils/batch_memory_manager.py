"""Opacus' ``BatchMemoryManager`` for dpfast's loader: physical chunks of at most
``max_physical_batch_size`` samples per logical (Poisson) batch.

dpfast's loader already does this (``make_private(..., max_physical_batch_size=N)``); this context
manager sets it for the ``with`` block, so an Opacus loop runs unchanged::

    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=64, optimizer=optimizer) as loader:
        for x, y in loader:
            optimizer.zero_grad(); loss_fn(model(x), y).backward()
            optimizer.step()     # True on the chunk that ends a logical batch; False on the others

Chunking never changes what is released: the logical batch, its clipping and its noise are the same
whatever the chunk size.
"""
from __future__ import annotations

from dpfast.data import DPDataLoader
from dpfast.errors import DPError


class BatchMemoryManager:
    def __init__(self, *, data_loader, max_physical_batch_size: int, optimizer=None):
        if not isinstance(data_loader, DPDataLoader):
            raise DPError("BatchMemoryManager takes the data loader that make_private returned (a dpfast "
                          f"DPDataLoader), got {type(data_loader).__name__}")
        if isinstance(max_physical_batch_size, bool) or not isinstance(max_physical_batch_size, int) \
                or max_physical_batch_size < 1:
            raise ValueError(f"max_physical_batch_size must be an int >= 1, got {max_physical_batch_size!r}")
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        if optimizer is not None and getattr(data_loader, "optimizer", None) not in (None, optimizer, inner):
            raise DPError("BatchMemoryManager: this optimizer is not the one make_private attached to the loader")
        self.loader = data_loader
        self.size = max_physical_batch_size
        self._before = []

    def __enter__(self) -> DPDataLoader:
        self._before.append(self.loader.max_physical_batch_size)
        self.loader.max_physical_batch_size = self.size
        # an iterator started before planned its chunks with the old size: it is superseded (its next
        # chunk raises), so that the limit is never silently ignored
        self.loader._generation += 1
        return self.loader

    def __exit__(self, *exc) -> None:
        self.loader.max_physical_batch_size = self._before.pop()
