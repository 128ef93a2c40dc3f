"""Worker of tests/test_distributed.py, run as ``torchrun --standalone --nproc-per-node 2 dist_worker.py``.

It trains tiny models through dpfast on 2 gloo ranks and saves what each rank ends with; the test
runs :func:`train` in its own process (world of 1) for the reference. ``--fail crash`` makes rank 1
raise mid-run and ``--fail hang`` makes it stop answering: the run must then end with an error.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpfast import PrivacyEngine
from dpfast.errors import DPError, NonFiniteGradientError

N = 48           # data set size
PER_RANK = 6     # loader batch_size per rank: global expected batch 12, q = 0.25, 4 steps per epoch
STEPS = 4
FAIL_STEP = 1    # --fail: rank 1 misbehaves at this logical step

# name -> train() keyword arguments; each is also run on one process by the test
SCENARIOS = {
    "sigma0": dict(dtype=torch.float64, sigma=0.0, max_physical=2, perturb=True),
    "noise64": dict(dtype=torch.float64, sigma=1.0, max_physical=2),
    "noise32": dict(dtype=torch.float32, sigma=1.0, max_physical=None, perturb=True),
    "ddp": dict(dtype=torch.float64, sigma=0.7, max_physical=2, ddp=True, perturb=True),
    # q = 2/16: a rank often has no sample in a step (empty chunk); "mean" loss per chunk
    "sparse": dict(dtype=torch.float64, sigma=0.5, n=16, per_rank=1, steps=8, reduction="mean"),
    # a NaN sample owned by rank 1 (odd index) in step 1: the step is refused on every rank
    "refused": dict(dtype=torch.float64, sigma=0.5, nan_at_step=1, nonfinite="raise"),
    # the same NaN sample under the default nonfinite="zero": dropped, the step still released
    "dropped": dict(dtype=torch.float64, sigma=0.5, nan_at_step=1),
    "epsilon": dict(dtype=torch.float64, target_epsilon=8.0),
}


def nan_index(seed: int, q: float, n: int, step: int) -> int:
    """An odd (rank 1's) sample in the batch of ``step`` that is in no earlier step's batch."""
    from dpfast.random import poisson_mask

    earlier = torch.zeros(n, dtype=torch.bool)
    for s in range(step):
        earlier |= poisson_mask(n, q, seed=seed, step=s)
    members = (poisson_mask(n, q, seed=seed, step=step) & ~earlier).nonzero().flatten().tolist()
    return next(j for j in members if j % 2 == 1)


def make_model(dtype, buffer: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.GroupNorm(2, 8), nn.SiLU(), nn.Linear(8, 2)).to(dtype)
    if buffer:  # DDP broadcasts module buffers in forward unless dpfast switches that off
        model.register_buffer("scale", torch.ones((), dtype=dtype))
    return model


def train(*, world: int, rank: int, dtype, sigma: float = 0.0, max_physical=None, ddp: bool = False,
          perturb: bool = False, seed: int | None = 1234, n: int = N, per_rank: int = PER_RANK,
          steps: int = STEPS, reduction: str = "sum", nan_at_step: int | None = None,
          target_epsilon: float | None = None, fail: str | None = None, nonfinite: str = "zero") -> dict:
    """Train ``steps`` logical steps; returns this rank's final state. ``world``/``rank`` describe the
    run (the process group, when world > 1, is already initialised)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(n, 2, generator=g, dtype=torch.float64).to(dtype)
    if nan_at_step is not None:
        x[nan_index(seed, per_rank * world / n, n, nan_at_step)] = math.nan
    model = make_model(dtype, buffer=ddp)
    if perturb and rank != 0:
        with torch.no_grad():  # ranks start apart: make_private (or DDP) must broadcast rank 0's
            for p in model.parameters():
                p.add_(1.0)
    ddp = ddp and world > 1  # the single-process reference trains the bare model
    if ddp:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    engine = PrivacyEngine(accountant="rdp", seed=seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=per_rank)  # per rank, as for DDP
    common = dict(module=model, optimizer=opt, data_loader=loader, max_grad_norm=1.0,
                  max_physical_batch_size=max_physical, loss_reduction=reduction, backend="torch",
                  nonfinite=nonfinite)
    if target_epsilon is not None:
        model, opt, loader = engine.make_private_with_epsilon(target_epsilon=target_epsilon, target_delta=1e-5,
                                                              steps=steps, **common)
    else:
        model, opt, loader = engine.make_private(noise_multiplier=sigma, **common)
    if ddp and rank == 0:  # a forward on rank 0 only (e.g. a progress sample) must not disturb training
        with torch.no_grad():
            model(x[:3])
    chunks, refused, errors = [], 0, []
    it = iter(loader)
    while engine.steps + refused < steps:
        xb, yb = next(it, (None, None))
        if xb is None:
            it = iter(loader)
            continue
        step = loader.step - 1 if opt._chunk[1] else loader.step  # logical step of this chunk
        if fail == "crash" and rank == 1 and step == FAIL_STEP:
            raise RuntimeError("rank 1 failed on purpose")
        if fail == "hang" and rank == 1 and step == FAIL_STEP:
            time.sleep(600)
        chunks.append((step, len(xb)))
        opt.zero_grad()
        per_row = (model(xb) - yb).square().sum(1)
        (per_row.sum() if reduction == "sum" else per_row.mean()).backward()
        try:
            opt.step()
        except NonFiniteGradientError as e:  # the refused step: same class on every rank
            refused += 1
            errors.append(f"{type(e).__name__}: {e}")
    inner = model.module if ddp else model
    return {"params": torch.cat([p.detach().reshape(-1) for p in inner.parameters()]),
            "steps": engine.steps, "refused": refused, "errors": errors, "chunks": chunks,
            "sample_rate": engine.sample_rate, "noise_multiplier": engine.noise_multiplier,
            "expected_batch_size": opt.expected_batch_size,
            "epsilon": engine.get_epsilon(1e-5) if engine.noise_multiplier else math.inf,
            "seed": engine.seed, "loader_batch": per_rank}


def _seed_checks(world: int, rank: int) -> dict:
    """An OS-drawn seed becomes rank 0's on every rank; explicit seeds that differ are refused."""
    def make_private(seed):
        engine = PrivacyEngine(accountant="rdp", seed=seed)
        m = make_model(torch.float64)
        try:
            engine.make_private(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                                noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4.0, backend="torch")
        except DPError as e:
            return str(e)
        return engine.seed

    return {"random_seed": make_private(None),
            "mismatch_error": make_private(100 + rank),                   # explicit, different
            "partial_error": make_private(5 if rank == 1 else None)}     # explicit on rank 1 only


def _resume_checks(world: int, rank: int) -> dict:
    """A checkpoint loaded after make_private (accelerate's order), by engines with OS-drawn seeds: on
    every rank it is adopted and the run goes on; on rank 0 only, the first release stops every rank
    (their seeds differ) before anything is released, and no guarantee is lost."""
    x = torch.randn(N, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    data = TensorDataset(x, x[:, :2].clone())

    def engine_and_loop():
        engine = PrivacyEngine(accountant="rdp")
        m = make_model(torch.float64)
        m, opt, loader = engine.make_private(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                                             data_loader=DataLoader(data, batch_size=PER_RANK),
                                             noise_multiplier=1.0, max_grad_norm=1.0, backend="torch")

        def run(n):
            done = 0
            while done < n:
                for xb, yb in loader:
                    opt.zero_grad()
                    (m(xb) - yb).square().sum().backward()
                    if opt.step():
                        done += 1
                        if done == n:
                            break
        return engine, m, run

    first, _, run = engine_and_loop()
    run(2)
    state = first.state_dict()
    out = {}
    for who in ("all", "rank0"):
        engine, m, run = engine_and_loop()
        if who == "all" or rank == 0:
            engine.load_state_dict(state)
        try:
            run(1)
            out[who] = {"steps": engine.steps, "seed": engine.seed, "key": engine.key_seed,
                        "params": torch.cat([p.detach().reshape(-1) for p in m.parameters()])}
        except DPError as e:
            out[who] = {"error": f"{type(e).__name__}: {e}", "steps": engine.steps,
                        "lost": engine.why_no_privacy}
    out["first_seed"] = first.seed
    out["first_key"] = first.key_seed
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--fail", choices=["crash", "hang"])
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--only", nargs="*", help="run only these scenarios (debugging)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from dpfast.launch import barrier, destroy_distributed, init_distributed_from_env

    info = init_distributed_from_env(backend="gloo", timeout_s=args.timeout)
    assert info.world_size == 2 and info.backend == "gloo", info
    if args.fail:
        train(world=info.world_size, rank=info.rank, dtype=torch.float64, sigma=1.0, fail=args.fail)
        sys.exit(f"rank {info.rank}: --fail {args.fail} did not fail")
    results = {name: train(world=info.world_size, rank=info.rank, **kw) for name, kw in SCENARIOS.items()
               if not args.only or name in args.only}
    results.update(_seed_checks(info.world_size, info.rank))
    results["resume"] = _resume_checks(info.world_size, info.rank)
    results["is_main"] = info.is_main
    torch.save(results, os.path.join(args.out, f"rank{info.rank}.pt"))
    barrier()
    destroy_distributed()


if __name__ == "__main__":
    main()
