"""bf16 autocast (what fast GPU training runs; here on CPU): the private step runs, keeps parameter
gradients fp32, and its norms and update stay within bf16 error of the fp32 step."""
from __future__ import annotations

import copy

import pytest
import torch

from dpfast import PrivacyEngine
from dpfast.errors import PrivacyLeakError
from test_engine_exact import Blocks, _data, rows_fn_for


def _step(model, inputs, autocast, mode):
    m = copy.deepcopy(model)
    e = PrivacyEngine(accountant="rdp", seed=0)
    m, o, _ = e.make_private(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=1.0), noise_multiplier=0.0,
                             max_grad_norm=0.1, multiplicity=2, expected_batch_size=4, backend="torch", mode=mode)
    before = [p.detach().clone() for p in m.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        rows = rows_fn_for(2)(m, *inputs)
    rows.float().mean().backward()
    o.step()
    assert all(p.dtype == torch.float32 for p in m.parameters())
    return o.last_norms, torch.cat([(b - p.detach()).flatten() for b, p in zip(before, m.parameters())])


@pytest.mark.filterwarnings("ignore:noise_multiplier=0")
@pytest.mark.parametrize("mode", ["bk"])
def test_bf16_autocast_step_is_within_bf16_error(mode):
    torch.manual_seed(0)
    model = Blocks().float()
    inputs = tuple(t.float() if t.is_floating_point() else t for t in _data(4))
    n32, u32 = _step(model, inputs, False, mode)
    n16, u16 = _step(model, inputs, True, mode)
    # bf16 has 8 bits of mantissa (unit roundoff 2^-9 = 2e-3); a few layers of it give ~5e-3
    assert ((n16 - n32).norm() / n32.norm()).item() < 2e-2
    assert ((u16 - u32).norm() / u32.norm()).item() < 2e-2


@pytest.mark.filterwarnings("ignore:noise_multiplier=0")
def test_two_pass_under_bf16_autocast_is_refused():
    # its replayed backward rounds the clip-scaled gradients to bf16: contributions could pass C
    torch.manual_seed(0)
    inputs = tuple(t.float() if t.is_floating_point() else t for t in _data(4))
    with pytest.raises(PrivacyLeakError, match="two-pass mode under bf16/fp16 autocast is refused"):
        _step(Blocks().float(), inputs, True, "two-pass")
