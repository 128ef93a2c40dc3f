"""Worker of tests/test_audit_distributed.py: ``python audit_worker.py --nprocs W ...``, or the same
under ``torchrun --nproc-per-node W`` (without ``--nprocs``).

Each rank runs :func:`dpfast.audit.audit_engine` under the gloo process group (each rank clips its own
members of every Poisson batch, one all-reduce per step), first on the engine as it is, then with the
noise added once per rank instead of once per step (:func:`noise_once_per_rank`, switched on here
only), and writes its two reports to ``--out/rank{r}.json``.

``--nprocs W`` forks the W ranks from one process that has already imported torch, dpfast and the
accountant, and gives each the environment torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT): the
ranks then join the gloo group through the same ``init_distributed_from_env`` and dpfast detects it as
it does under torchrun. Only the launcher differs; on a 2-core machine importing torch in 16 fresh
processes would take most of a minute.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os

import torch

import dpfast.optimizer as opt_mod
from dpfast.audit import audit_engine
from dpfast.optimizer import DPOptimizer


@contextlib.contextmanager
def noise_once_per_rank():
    """The broken mechanism: every rank adds its own share of the noise to its clipped sum before the
    all-reduce, drawn from a generator keyed on its rank, and the shares were sized as if standard
    deviations added up (sigma * C / world each) while the fused finalize adds none. The reduced sum
    then carries noise of std sigma * C / sqrt(world): a quarter of the claimed noise at 16 ranks."""
    finalize, release = opt_mod.finalize_, DPOptimizer._finalize_logical_batch

    def shares(self):
        ctx = self.distributed
        std = self.noise_multiplier * self.max_grad_norm / ctx.world_size
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.steps * 65_537 + ctx.rank) % 2**63)
        for p in self.params:
            acc = self._acc_for(p)
            acc.add_(torch.randn(acc.shape, generator=g, dtype=acc.dtype), alpha=std)
        return release(self)

    opt_mod.finalize_ = lambda *a, noise_std, **k: finalize(*a, noise_std=0.0, **k)
    DPOptimizer._finalize_logical_batch = shares
    try:
        yield
    finally:
        opt_mod.finalize_, DPOptimizer._finalize_logical_batch = finalize, release


def _summary(rep) -> dict:
    return {k: getattr(rep, k) for k in ("epsilon_lower", "epsilon_claimed", "violated", "correct", "guesses",
                                         "noise_multiplier", "world_size", "note")}


def run_rank(args) -> None:
    torch.set_num_threads(1)
    from dpfast.launch import destroy_distributed, init_distributed_from_env

    info = init_distributed_from_env(backend="gloo", timeout_s=args.timeout)
    kw = dict(noise_multiplier=args.noise_multiplier, steps=1, sample_rate=1.0, canaries=args.canaries,
              delta=1e-5, beta=0.01, guess_fractions=(0.005, 0.01, 0.02, 0.05, 0.1), seed=args.seed)
    out = {"correct": _summary(audit_engine(**kw))}
    with noise_once_per_rank():
        out["noise_once_per_rank"] = _summary(audit_engine(**kw))
    with open(os.path.join(args.out, f"rank{info.rank}.json"), "w") as f:
        json.dump(out, f)
    destroy_distributed()


def _forked_rank(rank: int, args, world: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    run_rank(args)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--noise-multiplier", type=float, required=True)
    ap.add_argument("--canaries", type=int, default=50000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--nprocs", type=int, default=None, help="fork this many ranks (else: run under torchrun)")
    args = ap.parse_args()
    if args.nprocs is None:
        run_rank(args)
        return
    # imported on first use by every rank (torch's first optimizer, the PRV accountant): once, here
    import importlib

    import torch.multiprocessing as mp

    for name in ("prv_accountant", "torch._dynamo"):
        importlib.import_module(name)

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    # a rank that raises ends the others (start_processes terminates them) and this process fails
    mp.start_processes(_forked_rank, args=(args, args.nprocs), nprocs=args.nprocs, start_method="fork")


if __name__ == "__main__":
    main()
