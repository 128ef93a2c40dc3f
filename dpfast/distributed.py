"""torch.distributed support: each rank clips its own samples; one all-reduce of the clipped sums per
logical step; every rank then adds the same noise (keyed on seed/step/element, never on the rank), so
the noise is added exactly once and all ranks hold identical parameters.

What has to agree across ranks, and who makes it agree (all at ``make_private``):

* the parameters: DDP broadcasts rank 0's at construction; for a model that is not DDP-wrapped
  :meth:`DistributedContext.broadcast_module_` does the same;
* the seed (Poisson membership and noise): :meth:`DistributedContext.agree_seed` adopts rank 0's
  OS-drawn seed, and refuses explicit seeds that differ between ranks;
* the collective count: exactly one all-reduce per logical step on every rank, whatever the number
  of physical chunks a rank's share of the batch splits into. A rank whose step is refused (e.g. a
  non-finite gradient in its last chunk) still takes part, with a failure flag in the same buffer,
  so the step is refused on every rank instead of the ranks falling out of step.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from .errors import BatchLayoutError, DPError, NonFiniteGradientError, PrivacyLeakError

# A refused step's error class travels to the other ranks as a code (index + 1; anything else: DPError),
# so that every rank raises the same class: a loop that catches NonFiniteGradientError and goes on
# behaves as it does on one process.
_FAILURES = (NonFiniteGradientError, PrivacyLeakError, BatchLayoutError, DPError)


_FP_BYTES = 4  # state fingerprint carried in the gradient all-reduce: collisions 2**-32


def state_fingerprint(seed: int, key: int, sampler_step: int | None, mechanism: tuple = ()) -> bytes:
    """Bytes that differ (but for a 2**-32 collision) when two ranks would release with another seed,
    noise key, sampler step or mechanism (sigma, clip norm, expected batch size, reduction)."""
    return hashlib.sha256(f"{seed}:{key}:{sampler_step}:{mechanism!r}".encode()).digest()[:_FP_BYTES]


def failure_code(exc: BaseException) -> int:
    for i, cls in enumerate(_FAILURES):
        if type(exc) is cls:
            return i + 1
    return len(_FAILURES)


def refused_step_error(failed: dict[int, int], step: int) -> DPError:
    """The error every healthy rank raises when ranks ``failed`` ({rank: code}) refused ``step``."""
    codes = set(failed.values())
    cls = _FAILURES[codes.pop() - 1] if len(codes) == 1 else DPError
    return cls(f"logical step {step} was refused on every rank because rank(s) {sorted(failed)} refused "
               f"their share of the batch ({cls.__name__}; the error is shown on those ranks); no parameter "
               "changed")


def unwrap_ddp(module: nn.Module):
    """(inner module, the DDP wrapper or None). dpfast does the gradient all-reduce itself, so DDP's
    reducer is switched off (its hooks would see no weight gradients)."""
    ddp_cls = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    if ddp_cls is not None and isinstance(module, ddp_cls):
        module.require_backward_grad_sync = False
        # No collective in DDP's forward either: it broadcasts buffers while this flag is set (it starts
        # True: the first forward), and ranks run different numbers of forwards (Poisson batches split
        # into different numbers of chunks), so DDP's forward must never communicate. Parameters and
        # buffers were broadcast from rank 0 when DDP was constructed.
        module.require_forward_param_sync = False
        return module.module, module
    return module, None


def _comm_device(group) -> torch.device:
    """Where tensors for a collective on ``group`` must live (NCCL: the current CUDA device)."""
    backend = str(torch.distributed.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class DistributedContext:
    rank: int          # rank within ``group``
    world_size: int    # size of ``group``
    group: object = None  # None: the default (WORLD) group
    disagree: bool = False  # the last all_reduce_ met ranks in different states (seed, key, sampler step)

    @classmethod
    def detect(cls, ddp=None):
        """The context of an initialised process group with more than one rank, else None. A DDP
        wrapper's own process group is used when it has one (rank and size are taken within it)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = getattr(ddp, "process_group", None)
        world = dist.get_world_size(group)
        if world == 1:
            return None
        return cls(rank=dist.get_rank(group), world_size=world, group=group)

    @property
    def src(self) -> int:
        """Global rank of this group's rank 0 (the source of broadcasts)."""
        if self.group is None:
            return 0
        return torch.distributed.get_global_rank(self.group, 0)

    def all_reduce_(self, tensors: list[torch.Tensor], failed: int = 0, step: int | None = None,
                    fingerprint: bytes = b"\0" * _FP_BYTES) -> dict[int, int]:
        """Sum the clipped sums over ranks with ONE collective (flattened into one buffer), in place.

        A failure flag rides in the same buffer: a rank whose logical batch was refused passes
        ``failed=failure_code(exc)`` (and zeros). Returns {rank: code} of the ranks that flagged a
        failure; the caller refuses the step on every rank when it is not empty. ``step`` only names
        the logical step in the error raised when the collective itself fails (timeout, dead rank).

        ``fingerprint`` (:func:`state_fingerprint` of the seed, noise key and sampler step) rides there
        too, one byte per slot (integers below 256 are exact in bf16, fp16 and fp32, and each slot has
        one writer, so the sum is the byte). After the call ``self.disagree`` says whether the ranks'
        fingerprints differed: ranks with different seeds would draw different Poisson batches (a record
        in two ranks' shares counts twice: sensitivity 2C) and different noise.
        """
        if tensors:
            dtype = tensors[0].dtype
            for t in tensors[1:]:
                dtype = torch.promote_types(dtype, t.dtype)
            device = tensors[0].device
        else:
            dtype, device = torch.float32, _comm_device(self.group)
        if len(fingerprint) != _FP_BYTES:
            raise ValueError(f"fingerprint must be {_FP_BYTES} bytes")
        flags = torch.zeros(self.world_size * (1 + _FP_BYTES), dtype=dtype, device=device)
        flags[self.rank] = float(failed)
        fp_at = self.world_size + self.rank * _FP_BYTES
        flags[fp_at:fp_at + _FP_BYTES] = torch.tensor(list(fingerprint), dtype=dtype, device=device)
        flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors] + [flags])
        try:
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=self.group)
        except RuntimeError as e:
            # Not a DPError: a loop that catches dpfast's step refusals must not swallow this one.
            what = "the gradient all-reduce" + (f" of logical step {step}" if step is not None else "")
            raise RuntimeError(
                f"rank {self.rank}/{self.world_size}: {what} failed ({e}). Another rank probably crashed, "
                "hung, or is at another step (every rank must call optimizer.step() for every batch its "
                "loader yields); see the other ranks' errors. The process group's timeout "
                "(init_process_group(timeout=...), dpfast.launch.init_distributed_from_env(timeout_s=...)) "
                "bounds how long a rank waits.") from e
        off = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[off:off + n].view_as(t))
            off += n
        tail = [int(f) for f in flat[off:].tolist()]
        prints = {tuple(tail[self.world_size + r * _FP_BYTES:self.world_size + (r + 1) * _FP_BYTES])
                  for r in range(self.world_size)}
        self.disagree = len(prints) > 1
        return {r: f for r, f in enumerate(tail[:self.world_size]) if f != 0}

    def agree_seed(self, seed: int, given: bool) -> int:
        """The seed every rank uses. Membership and noise are keyed on it, so ranks must agree: when no
        rank chose its seed (``given=False`` everywhere: drawn from the OS), rank 0's is used by all;
        otherwise every rank must have been given the same one. Raises on every rank, or on none."""
        # seeds are in [0, 2**64): carried as two's-complement int64
        mine = torch.tensor([seed - (1 << 64) if seed >= (1 << 63) else seed, int(given)], dtype=torch.int64,
                            device=_comm_device(self.group))
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        torch.distributed.all_gather(gathered, mine, group=self.group)
        seeds = [int(t[0].item()) % (1 << 64) for t in gathered]
        givens = [bool(t[1].item()) for t in gathered]
        if any(givens) and not (all(givens) and len(set(seeds)) == 1):
            raise DPError(f"the PrivacyEngine seed differs between ranks ({len(set(seeds))} distinct seeds; "
                          f"given explicitly on ranks {[r for r, g in enumerate(givens) if g]}). Poisson "
                          "sampling and the noise are keyed on the seed: pass the same seed on every rank "
                          "(PrivacyEngine(seed=...) or the same checkpoint), or none (rank 0's random seed "
                          "is then used by all)")
        return seeds[0]

    def broadcast_module_(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank (what DDP does at construction), one
        collective per (device, dtype)."""
        groups: dict[tuple, list[torch.Tensor]] = {}
        for t in list(module.parameters()) + list(module.buffers()):
            groups.setdefault((t.device, t.dtype), []).append(t)
        with torch.no_grad():
            for (_, dtype), ts in groups.items():
                flat = torch.cat([t.detach().reshape(-1) for t in ts])
                if dtype == torch.bool:  # gloo has no bool collectives
                    flat = flat.to(torch.uint8)
                torch.distributed.broadcast(flat, src=self.src, group=self.group)
                off = 0
                for t in ts:
                    t.copy_(flat[off:off + t.numel()].view_as(t))
                    off += t.numel()


def world_size_of(module: nn.Module) -> int:
    """Ranks that share the data set when training ``module`` (1 outside a distributed run)."""
    ctx = DistributedContext.detect(unwrap_ddp(module)[1])
    return ctx.world_size if ctx is not None else 1
