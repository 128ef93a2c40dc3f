"""Distributed DP-SGD on CPU: 2 gloo ranks under torchrun against one process with the same seed.

Poisson membership is keyed on (seed, step, sample index) and the noise on (seed, step, element
index), never on the rank, so 2 ranks must end with the parameters one process ends with (fp64: up
to the order of the cross-rank sum, ~1e-16; fp32: ~1e-7), with or without noise, DDP-wrapped or not.
A rank that crashes or hangs must end the run with an error, never leave it waiting.

The ranks run tests/dist_worker.py (all scenarios in one torchrun launch: starting processes is the
slow part); the single-process references run here meanwhile.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import dist_worker as W

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = 2
RUN_TIMEOUT_S = 150     # a launch still running after this is killed and its test fails
HANG_PG_TIMEOUT_S = 6   # process-group timeout of the run whose rank 1 hangs
# (dtype -> rtol) for parameters after training vs one process: only the cross-rank sum order differs
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def _gloo_reason():
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with gloo is not available"
    return None


class _Launch:
    """``torchrun --standalone --nproc-per-node 2 dist_worker.py ...`` in its own process group, so a
    timeout kills the workers too, not just the launcher."""

    def __init__(self, out, *args):
        # the ranks import the same dpfast as this process (the installed one in CI): PYTHONPATH as is
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
               "--monitor-interval=0.2", os.path.join(HERE, "dist_worker.py"), "--out", str(out), *args]
        self.start = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)

    def wait(self):
        """(return code, output, seconds); a run past RUN_TIMEOUT_S is killed and fails the test."""
        left = RUN_TIMEOUT_S - (time.monotonic() - self.start)
        try:
            out, _ = self.proc.communicate(timeout=max(left, 1))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            out, _ = self.proc.communicate()
            pytest.fail(f"torchrun did not finish within {RUN_TIMEOUT_S} s (a rank hangs):\n{out[-4000:]}")
        return self.proc.returncode, out, time.monotonic() - self.start


def _reference(name):
    kw = dict(W.SCENARIOS[name])
    per_rank = kw.pop("per_rank", W.PER_RANK)
    # one process reads the same data with batch_size = WORLD x the per-rank batch size
    return W.train(world=1, rank=0, per_rank=WORLD * per_rank, **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Launch the 2-rank runs (scenarios, a crashing rank, a hanging rank) and compute the
    single-process references while they run."""
    reason = _gloo_reason()
    if reason:
        pytest.skip(reason)
    dirs = {k: tmp_path_factory.mktemp(k) for k in ("ok", "crash", "hang")}
    launches = {"ok": _Launch(dirs["ok"], "--timeout", "60")}
    launches["crash"] = _Launch(dirs["crash"], "--fail", "crash", "--timeout", "60")
    launches["hang"] = _Launch(dirs["hang"], "--fail", "hang", "--timeout", str(HANG_PG_TIMEOUT_S))
    torch.set_num_threads(1)
    refs = {name: _reference(name) for name in W.SCENARIOS}
    done = {k: launch.wait() for k, launch in launches.items()}
    rc, out, _ = done["ok"]
    assert rc == 0, f"the 2-rank run failed:\n{out[-6000:]}"
    ranks = [torch.load(dirs["ok"] / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"ranks": ranks, "refs": refs, "crash": done["crash"], "hang": done["hang"]}


def _check_same_as_one_process(runs, name):
    ranks, ref = runs["ranks"], runs["refs"][name]
    a, b = ranks[0][name], ranks[1][name]
    # every rank holds bitwise the same parameters: one all-reduce result, the same noise
    assert torch.equal(a["params"], b["params"]), f"{name}: ranks disagree"
    assert a["steps"] == ref["steps"] and a["refused"] == ref["refused"]
    p, want = a["params"], ref["params"]
    rtol = RTOL[p.dtype]
    torch.testing.assert_close(p, want, rtol=rtol, atol=rtol * want.abs().max().item())
    # ... and they did split the work: each rank saw only its own samples
    seen = [sum(n for _, n in r["chunks"]) for r in (a, b)]
    assert all(seen) and sum(seen) == sum(n for _, n in ref["chunks"])
    return a, b, ref


@pytest.mark.parametrize("name", ["sigma0", "noise64", "noise32"])
def test_equals_one_process(runs, name):
    """sigma=0 and sigma>0 (same seed): the parameters one process would reach. These runs use
    physical chunks (ranks step through different numbers of them) and, for sigma0/noise32, start
    rank 1 from other parameters: make_private broadcasts rank 0's."""
    _check_same_as_one_process(runs, name)


def test_ddp_wrapped_model(runs):
    """A DDP-wrapped model (with a buffer, and a rank-0-only forward after make_private): DDP's own
    reducer and buffer broadcast stay out of the way; same result as one process."""
    _check_same_as_one_process(runs, "ddp")


def test_ranks_with_empty_batches(runs):
    """q = 1/8 on 8 samples per rank: some steps give a rank no sample at all ("mean" loss)."""
    a, b, _ = _check_same_as_one_process(runs, "sparse")
    assert any(n == 0 for r in (a, b) for _, n in r["chunks"]), "no rank had an empty step; retune the test"


def test_refused_step_is_refused_on_every_rank(runs):
    """A NaN sample on rank 1 only: rank 1 refuses its share, rank 0 learns it through the step's
    all-reduce and raises the same error class; the ranks stay in step, as one process would."""
    a, b, _ = _check_same_as_one_process(runs, "refused")
    assert a["refused"] >= 1
    assert all("rank(s) [1]" in e and e.startswith("NonFiniteGradientError") for e in a["errors"])
    assert all("non-finite gradient norms" in e for e in b["errors"])
    assert a["epsilon"] == b["epsilon"] == math.inf  # a refusal depends on the data without noise


def test_nonfinite_sample_is_dropped_on_its_rank_by_default(runs):
    """The same NaN sample under the default nonfinite="zero": dropped by its rank, the step released
    and charged on every rank, as one process would."""
    a, b, ref = _check_same_as_one_process(runs, "dropped")
    assert a["refused"] == 0 and a["steps"] == ref["steps"] == W.STEPS
    assert math.isfinite(a["epsilon"]) and a["epsilon"] == pytest.approx(ref["epsilon"], rel=1e-12)


def test_accountant_sees_the_global_sampling_rate(runs):
    for name in ("noise64", "epsilon"):
        a, b, ref = (runs["ranks"][0][name], runs["ranks"][1][name], runs["refs"][name])
        q = WORLD * W.PER_RANK / W.N   # the loader's batch_size is per rank
        for r in (a, b):
            assert r["sample_rate"] == pytest.approx(q) == ref["sample_rate"]
            assert r["expected_batch_size"] == pytest.approx(q * W.N)
            assert r["epsilon"] == pytest.approx(ref["epsilon"], rel=1e-12)
            assert r["noise_multiplier"] == pytest.approx(ref["noise_multiplier"], rel=1e-12)
    assert math.isfinite(a["epsilon"]) and a["epsilon"] <= 8.0  # make_private_with_epsilon's target


def test_seeds_agree_across_ranks(runs):
    r0, r1 = runs["ranks"]
    assert isinstance(r0["random_seed"], int) and r0["random_seed"] == r1["random_seed"]  # rank 0's OS seed
    for r in (r0, r1):  # every rank raises (none goes on to wait for the others)
        for key in ("mismatch_error", "partial_error"):
            assert isinstance(r[key], str) and "seed differs between ranks" in r[key]
    assert r0["is_main"] and not r1["is_main"]


def test_checkpoint_loaded_after_make_private(runs):
    """Loaded on every rank after make_private: the checkpoint's seed is adopted and the ranks go on in
    step. Loaded on rank 0 only: the first release's all-reduce finds the ranks' seeds, noise keys
    and sampler steps differ, and every rank stops before anything is released, its guarantee intact."""
    r0, r1 = (r["resume"] for r in runs["ranks"])
    assert r0["all"]["seed"] == r1["all"]["seed"] == r0["first_seed"]
    # a fresh noise and Poisson key, the same on both ranks without a collective (PrivacyEngine._resume_key)
    assert r0["all"]["key"] == r1["all"]["key"] != r0["first_key"]
    assert r0["all"]["steps"] == r1["all"]["steps"] == 3
    assert torch.equal(r0["all"]["params"], r1["all"]["params"])
    for r, steps in ((r0, 2), (r1, 0)):
        bad = r["rank0"]
        assert bad["error"].startswith("RankStateMismatchError") and "some ranks only" in bad["error"], bad
        assert bad["steps"] == steps and bad["lost"] is None


def test_crashing_rank_stops_the_run(runs):
    """Rank 1 raises while rank 0 waits in the step's all-reduce: rank 0's all-reduce fails at once
    (gloo: connection closed) or torchrun stops it, and the run fails with rank 1's error."""
    rc, out, _ = runs["crash"]
    assert rc != 0, out[-4000:]
    assert "rank 1 failed on purpose" in out, out[-4000:]


def test_hanging_rank_times_out(runs):
    """Rank 1 stops answering: rank 0's all-reduce gives up after the process-group timeout with an
    error that says what happened, and the run fails."""
    rc, out, _ = runs["hang"]
    assert rc != 0, out[-4000:]
    assert "the gradient all-reduce of logical step" in out and "Another rank probably crashed" in out, out[-4000:]


def test_launch_helpers_outside_torchrun(monkeypatch):
    from dpfast.launch import barrier, init_distributed_from_env, is_main_process

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    info = init_distributed_from_env()
    assert (info.rank, info.world_size, info.local_rank, info.is_main, info.backend) == (0, 1, 0, True, None)
    assert is_main_process()
    barrier()  # no-op
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed_from_env().world_size == 1 and not torch.distributed.is_initialized()
