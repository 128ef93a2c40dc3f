"""dpfast/_precision.py: the engine's arithmetic runs without autocast and without TF32/bf16
'fast fp32', and gives the caller's settings back exactly (on exit and on error)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dpfast._precision import _NEW_API, _fp32_backends, exact_fp32


def test_autocast_is_off_inside_and_back_after():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with exact_fp32():
            assert not torch.is_autocast_enabled("cpu")
            assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")


@pytest.mark.skipif(not _NEW_API, reason="torch without the per-backend fp32_precision API")
def test_fp32_precision_is_ieee_inside_and_restored_even_on_error():
    before = [o.fp32_precision for o in _fp32_backends()]
    with pytest.raises(KeyError):
        with exact_fp32():
            assert all(o.fp32_precision == "ieee" for o in _fp32_backends())
            raise KeyError("boom")
    assert [o.fp32_precision for o in _fp32_backends()] == before  # "none" stays "none"


# Each scenario in a fresh interpreter: how a training script may have set TF32 before dpfast runs.
SCENARIOS = {
    "default": "",
    "legacy flags": "torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True",
    "matmul precision": "torch.set_float32_matmul_precision('high')",
    "new API": "torch.backends.cuda.matmul.fp32_precision = 'tf32'",
    "new API, global": "torch.backends.fp32_precision = 'tf32'",
}
STEP = """
import torch
from torch import nn
from dpfast import PrivacyEngine
from dpfast._precision import _fp32_backends
{setup}
state = lambda: [getattr(o, "fp32_precision", None) for o in _fp32_backends()]
before = state()
m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
m, opt, _ = PrivacyEngine(accountant="rdp", seed=0).make_private(
    module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=1.0,
    max_grad_norm=1.0, expected_batch_size=4, backend="torch")
m(torch.randn(4, 2, 6, 6)).square().sum().backward()
opt.step()
assert state() == before, (before, state())
print("ok")
"""


@pytest.mark.parametrize("setup", list(SCENARIOS.values()), ids=list(SCENARIOS))
def test_a_step_leaves_the_callers_tf32_settings_alone(setup):
    proc = subprocess.run([sys.executable, "-c", STEP.format(setup=setup)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
