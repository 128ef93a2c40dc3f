"""Process-group setup for runs under ``torchrun`` (one process per GPU, any number of nodes).

    from dpfast.launch import init_distributed_from_env, is_main_process, barrier

    dist_info = init_distributed_from_env()        # no-op (rank 0 of 1) when not under torchrun
    model = build().to(dist_info.device)
    model, optimizer, loader = engine.make_private(...)   # detects the process group by itself
    ...
    if is_main_process():
        torch.save(state, path)                    # checkpoints are written by rank 0 only
    barrier()                                      # ... and read by every rank after this

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; the process group is built
from them (``env://``). The timeout bounds every collective: a rank that stops answering (crashed,
hung) makes the others fail with an error after ``timeout_s`` instead of waiting forever, and
torchrun then stops the whole run.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

__all__ = ["DistInfo", "init_distributed_from_env", "is_main_process", "barrier", "destroy_distributed"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None     # None: no process group (a single process)
    device: torch.device = torch.device("cpu")  # this rank's device: cuda:LOCAL_RANK when CUDA is there

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer; it should be set "
                           "by torchrun") from None


def init_distributed_from_env(backend: str | None = None, timeout_s: float = 600) -> DistInfo:
    """Join the process group torchrun describes in the environment; returns this rank's DistInfo.

    backend: None picks NCCL when CUDA is available, else gloo. With CUDA, the current device is set
    to ``cuda:LOCAL_RANK`` (one GPU per process). Outside torchrun (no RANK/WORLD_SIZE) and for a
    world of 1, no process group is made and rank 0 of 1 is returned. Calling it again returns the
    existing group's info.
    """
    dist = torch.distributed
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return DistInfo(device=device)
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    device = torch.device("cpu")
    if cuda:
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise RuntimeError(f"LOCAL_RANK={local_rank} but this node has {count} visible GPU(s): start at "
                               f"most {count} processes per node (torchrun --nproc-per-node {count})")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if world == 1:
        return DistInfo(rank=rank, world_size=1, local_rank=local_rank, device=device)
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    if not dist.is_initialized():
        backend = backend or ("nccl" if cuda else "gloo")
        kwargs = {"backend": backend, "init_method": "env://", "rank": rank, "world_size": world,
                  "timeout": timedelta(seconds=timeout_s)}
        if backend == "nccl" and "device_id" in inspect.signature(dist.init_process_group).parameters:
            kwargs["device_id"] = device  # binds the communicator to this rank's GPU
        dist.init_process_group(**kwargs)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    backend=str(dist.get_backend()), device=device)


def _initialized() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True on global rank 0 (and in a single process): the rank that writes checkpoints and logs."""
    if _initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group), e.g. after rank 0 wrote a checkpoint."""
    if _initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def destroy_distributed() -> None:
    """Leave the process group (call once at the end of training; no-op without one)."""
    if _initialized():
        torch.distributed.destroy_process_group()
