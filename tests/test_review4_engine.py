"""Review 4 findings on this session's engine changes (/tmp/review4/REPORT.md, N1, N3, N5).

N1. GroupNorm's fused backward wrote each row's affine gradients before the tape's checks: a second
    backward in one step (retain_graph), refused by the tape but caught by the script, overwrote the
    gradients whose norms had been taken, and the next step() released the second gradient with the
    first one's clip factors (norm 3304 against a bound of 4).
N3. PyTorch's CUDA GroupNorm backward launches one block row per group, at most 65535: with the batch
    passed as one row of N x groups groups, rows go in chunks.
"""
import warnings

import pytest
import torch
from torch import nn

from dpfast import PrivacyEngine
from dpfast.errors import UnsupportedModuleError


@pytest.mark.parametrize("norm_method", ["direct", "materialize", "auto"])
def test_a_refused_second_backward_leaves_the_clipped_gradients_alone(norm_method):
    torch.manual_seed(0)
    B, C = 4, 4
    gn = nn.GroupNorm(2, C)
    engine = PrivacyEngine(accountant="rdp", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noise_multiplier=0: the clipped sum is what is released
        m, opt, _ = engine.make_private(module=gn, optimizer=torch.optim.SGD(gn.parameters(), lr=1.0),
                                        noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=B,
                                        sample_rate=1.0, loss_reduction="sum", backend="torch",
                                        norm_method=norm_method)
    x, w = torch.randn(B, C, 3, 3), torch.randn(C, 3, 3)
    y = m(x)
    (y * w).sum().backward(retain_graph=True)
    with pytest.raises((UnsupportedModuleError, RuntimeError, KeyError)):
        (1000.0 * y * w).sum().backward()
    before = [p.detach().clone() for p in m.parameters()]
    try:
        opt.step()
    except Exception:  # refusing the step is fine too
        return
    moved = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, m.parameters())]).norm()
    assert moved <= B * 1.0 * (1 + 1e-5), moved  # each sample's clipped gradient has norm <= C


def test_group_norm_rows_in_chunks_give_the_same_gradients(monkeypatch):
    """MAX_GROUPS_PER_CALL made tiny: 7 rows x 3 groups in calls of 2 rows (6 groups), the last one short."""
    import dpfast.rules.normalization as N

    def step(limit):
        monkeypatch.setattr(N, "MAX_GROUPS_PER_CALL", limit)
        torch.manual_seed(1)
        model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.SiLU(), nn.Conv2d(6, 1, 1))
        engine = PrivacyEngine(accountant="rdp", seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m, opt, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                            noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=7,
                                            sample_rate=1.0, loss_reduction="sum", backend="torch")
        x = torch.randn(7, 2, 5, 5, generator=torch.Generator().manual_seed(2))
        before = [p.detach().clone() for p in m.parameters()]
        m(x).square().sum().backward()
        opt.step()
        return opt.last_norms, torch.cat([(b - p.detach()).flatten() for b, p in zip(before, m.parameters())])

    n_one, u_one = step(65535)
    n_chunks, u_chunks = step(6)
    torch.testing.assert_close(n_chunks, n_one, rtol=1e-6, atol=0)
    torch.testing.assert_close(u_chunks, u_one, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ N2: a copied run directory
def _ledger_run(path, steps=2, seed=3, adopt=False, sd=None):
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    engine = PrivacyEngine(accountant="rdp", seed=seed, ledger=path, adopt_copied_ledger=adopt)
    if sd is not None:
        engine.load_state_dict(sd)
    m, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.0,
                                         max_grad_norm=1.0)
    done = 0
    while done < steps:
        for x, y in loader:
            ((m(x) - y) ** 2).mean().backward()
            done += bool(opt.step())
            opt.zero_grad()
            if done >= steps:
                break
    return engine


def test_a_copied_ledger_is_refused_and_a_moved_one_resumes(tmp_path):
    """/tmp/review4/r5_ledger_copied_too.py: the checkpoint copied together with its ledger resumed and
    re-released the original's later noise keys. A copy is a new file: refused unless adopted."""
    import shutil

    from dpfast.ledger import FILE_EVENT, Ledger

    a = tmp_path / "a" / "ledger.jsonl"
    sd = _ledger_run(a, steps=2).state_dict()
    assert [e for e in Ledger(a).entries() if e.get("event") == FILE_EVENT]  # the file names itself
    (tmp_path / "b").mkdir()
    shutil.copy(a, tmp_path / "b" / "ledger.jsonl")
    with pytest.raises(ValueError, match="is a copy .*adopt_copied_ledger=True"):
        PrivacyEngine(accountant="rdp", ledger=tmp_path / "b" / "ledger.jsonl").load_state_dict(sd)
    # moved (a rename keeps the file): the run goes on
    (tmp_path / "moved").mkdir()
    (tmp_path / "a" / "ledger.jsonl").rename(tmp_path / "moved" / "ledger.jsonl")
    moved = PrivacyEngine(accountant="rdp", ledger=tmp_path / "moved" / "ledger.jsonl")
    moved.load_state_dict(sd)
    assert moved.accountant.steps == 2
    # adopted: the copy continues, its ledger names its new file at the first release, and resumes as its own
    adopted = _ledger_run(tmp_path / "b" / "ledger.jsonl", steps=1, adopt=True, sd=sd)
    assert Ledger(tmp_path / "b" / "ledger.jsonl").copied_from() is None
    PrivacyEngine(accountant="rdp", ledger=tmp_path / "b" / "ledger.jsonl").load_state_dict(adopted.state_dict())


def test_a_ledger_written_before_it_named_itself_is_not_refused(tmp_path):
    """Older ledgers have no ledger_file line: resumed as before, and named from their next write."""
    from dpfast.ledger import FILE_EVENT, Ledger

    path = tmp_path / "ledger.jsonl"
    sd = _ledger_run(path, steps=2).state_dict()
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines() if FILE_EVENT not in line))
    engine = _ledger_run(path, steps=1, sd=sd)
    assert engine.accountant.steps == 3
    assert Ledger(path).copied_from() is None and FILE_EVENT in path.read_text()
