"""The white-box audit under a process group: 16 gloo ranks run dpfast.audit.audit_engine (each rank
clips its own members of the Poisson batch, one all-reduce per step, the noise added once), on the
engine as it is and with the noise added once per rank instead of once per step (switched on in
tests/audit_worker.py only). The broken variant's ranks each add sigma * C / 16 of noise before the
all-reduce, sized as if independent shares added like standard deviations (they add like variances,
so a correct split would be sigma * C / sqrt(16) each), so the released sum carries sigma * C / 4: it must be flagged at a claimed eps of 1, and
the engine as it is must pass in the same setting.

False alarms: each audit's bound exceeds the true epsilon with probability at most beta = 0.01 (over
the canary coins and the noise); the seed is fixed, so CI is deterministic. Measured at seed 0: the
engine 0.28, the broken variant 1.66, claimed 1.00 (50,000 canaries, one step at q = 1); ~25 s wall
on 2 CPU cores.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dpfast.accounting import calibrate_noise_multiplier
from dpfast.audit import audit_engine

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = 16      # noise once per rank at sigma * C / WORLD each: sigma / 4 in all
RUN_TIMEOUT_S = 240
AUDIT = dict(canaries=50000, steps=1, sample_rate=1.0, delta=1e-5, beta=0.01,
             guess_fractions=(0.005, 0.01, 0.02, 0.05, 0.1), seed=0)   # as in tests/audit_worker.py


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("audit_dist")
    sigma = calibrate_noise_multiplier(1.0, 1e-5, 1.0, steps=1, accountant="prv")
    cmd = [sys.executable, os.path.join(HERE, "audit_worker.py"), "--out", str(out), "--nprocs", str(WORLD),
           "--noise-multiplier", repr(sigma)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    torch.set_num_threads(1)
    one_process = audit_engine(noise_multiplier=sigma, **AUDIT)  # meanwhile: the same audit on one process
    try:
        log, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"the {WORLD}-rank audit did not finish within {RUN_TIMEOUT_S} s:\n{log[-4000:]}")
    assert proc.returncode == 0, f"the {WORLD}-rank audit failed:\n{log[-6000:]}"
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {"reports": reports, "one_process": one_process, "seconds": time.monotonic() - start}


def test_every_rank_reports_the_same_audit(ranks):
    first = ranks["reports"][0]
    assert all(r == first for r in ranks["reports"]), "ranks disagree"
    for rep in first.values():
        assert rep["world_size"] == WORLD and rep["note"] == ""  # identical models on every rank


def test_the_distributed_engine_passes_its_audit(ranks):
    rep, ref = ranks["reports"][0]["correct"], ranks["one_process"]
    assert rep["epsilon_claimed"] == pytest.approx(1.0, rel=0.02)
    assert not rep["violated"] and rep["epsilon_lower"] > 0.1, rep  # consistent, and not a blind audit
    # 16 ranks release what one process releases (Poisson membership and noise never depend on the rank)
    assert (rep["correct"], rep["guesses"], rep["epsilon_lower"]) == (ref.correct, ref.guesses, ref.epsilon_lower)


def test_noise_added_once_per_rank_is_flagged(ranks):
    rep = ranks["reports"][0]["noise_once_per_rank"]
    assert rep["violated"], rep
