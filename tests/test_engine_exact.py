"""With noise_multiplier=0 the released gradient equals the clipped mean (or sum) of per-sample
gradients computed independently (batch-of-one loop), in fp64, to ~1e-10 relative."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import dpfast
from dpfast import PrivacyEngine
from oracle import clipped_sum_oracle



@pytest.fixture(autouse=True)
def _fp64():
    # exactness is claimed in fp64; restore the default so other test modules are unaffected
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class Blocks(nn.Module):
    """Every rule in one small network: convs of all kinds, norms, embedding, attention, N-D linear."""

    def __init__(self, mha_batch_first=True):
        super().__init__()
        self.emb = nn.Embedding(5, 8, padding_idx=0)
        self.conv = nn.Conv2d(3, 8, 3, padding="same")
        self.conv_s2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, dilation=1, groups=2)
        self.conv_dil = nn.Conv2d(8, 6, (3, 1), padding=(2, 0), dilation=2, bias=False)
        self.conv_even = nn.Conv2d(6, 6, 2, padding="same", padding_mode="reflect")
        self.gn = nn.GroupNorm(2, 6)
        self.up = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.c1 = nn.Conv1d(4, 4, 3, padding=1)
        self.ln = nn.LayerNorm(4)
        self.mha = nn.MultiheadAttention(4, 2, batch_first=mha_batch_first)
        self.lin = nn.Linear(4, 3)
        self.t_mlp = nn.Linear(8, 8)

    def forward(self, x, y):
        e = self.t_mlp(self.emb(y))                         # (N, 8)
        h = F.silu(self.conv(x)) + e[:, :, None, None]
        h = F.silu(self.conv_s2(h))
        h = self.conv_dil(h)
        h = self.gn(self.conv_even(h))
        h = self.up(h)                                      # (N, 4, H, W)
        N, C, H, W = h.shape
        seq = h.flatten(2)                                  # (N, 4, HW)
        seq = self.c1(seq).transpose(1, 2)                  # (N, HW, 4)
        seq = self.ln(seq)
        if self.mha.batch_first:
            a, _ = self.mha(seq, seq, seq, need_weights=False)
        else:
            s = seq.transpose(0, 1)
            a, _ = self.mha(s, s, s)
            a = a.transpose(0, 1)
        return self.lin(seq + a)                            # (N, HW, 3)


def rows_fn_for(K):
    def rows_fn(model, x, y, noise):
        # the K rows of a sample see different noise (noise multiplicity): noise is (B, 4, ...)
        xr = x.repeat_interleave(K, 0) + 0.3 * noise[:, :K].flatten(0, 1)
        out = model(xr, y.repeat_interleave(K, 0))
        return out.square().flatten(1).mean(1)
    return rows_fn


def _data(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 3, 8, 8, generator=g), torch.randint(0, 5, (B,), generator=g),
            torch.randn(B, 4, 3, 8, 8, generator=g))


def released_grads(model, rows_fn, inputs, *, K, C, reduction, mode="bk", opt="sgd", channels_last=False,
                   norm_method="auto"):
    """Run one private step with sigma=0, return the released gradient (from the SGD update)."""
    m = copy.deepcopy(model)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
        inputs = (inputs[0].contiguous(memory_format=torch.channels_last), *inputs[1:])
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    o = torch.optim.SGD(m.parameters(), lr=1.0)
    engine = PrivacyEngine(accountant="rdp", seed=0)
    B = inputs[0].shape[0]
    m, o, _ = engine.make_private(module=m, optimizer=o, noise_multiplier=0.0, max_grad_norm=C,
                                  multiplicity=K, loss_reduction=reduction, mode=mode, backend="torch",
                                  expected_batch_size=B, norm_method=norm_method)
    o.zero_grad()
    rows = rows_fn(m, *inputs)
    (rows.mean() if reduction == "mean" else rows.sum()).backward()
    assert o.step() is True
    LAST_PLAN[:] = engine.private_module.tape.last_plan
    return {n: before[n] - p.detach() for n, p in m.named_parameters()}, o.last_norms


LAST_PLAN: list = []  # the strategy each layer took in the last released_grads step


def _assert_close(got, want, rtol=1e-10):
    for n in want:
        scale = want[n].abs().max().clamp_min(1e-30)
        err = (got[n] - want[n]).abs().max() / scale
        assert err < rtol, f"{n}: relative error {err:.3e}"


@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("regime", ["none", "some", "all"])
def test_all_rules_match_oracle(K, reduction, regime):
    torch.manual_seed(0)
    model = Blocks()
    inputs = _data(5)
    rows_fn = rows_fn_for(K)
    _, norms = clipped_sum_oracle(model, rows_fn, inputs, K, C=1e9)
    C = {"none": norms.max().item() * 2, "all": norms.min().item() / 2,
         "some": norms.median().item()}[regime]
    want, _ = clipped_sum_oracle(model, rows_fn, inputs, K, C)
    B = inputs[0].shape[0]
    if reduction == "mean":
        want = {n: g / B for n, g in want.items()}
    got, got_norms = released_grads(model, rows_fn, inputs, K=K, C=C, reduction=reduction)
    torch.testing.assert_close(got_norms, norms, rtol=1e-10, atol=0)
    _assert_close(got, want)


@pytest.mark.parametrize("mode", ["bk", "two-pass"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_modes_and_memory_formats(mode, channels_last):
    torch.manual_seed(1)
    model = Blocks(mha_batch_first=False)
    inputs = _data(4, seed=3)
    K = 2
    rows_fn = rows_fn_for(K)
    _, norms = clipped_sum_oracle(model, rows_fn, inputs, K, C=1e9)
    C = norms.median().item()
    want, _ = clipped_sum_oracle(model, rows_fn, inputs, K, C)
    want = {n: g / 4 for n, g in want.items()}
    got, _ = released_grads(model, rows_fn, inputs, K=K, C=C, reduction="mean", mode=mode,
                            channels_last=channels_last)
    _assert_close(got, want)
    assert all(g.abs().sum() > 0 for g in got.values()), "a parameter was silently frozen"


# every strategy of dpfast.plan, for the whole model and forced per layer (the rest measured)
PER_LAYER = {"conv": "materialize", "conv_s2": "ghost", "conv_dil": "direct", "up": "materialize",
             "t_mlp": "ghost", "gn": "materialize", "c1": "direct", "lin": "materialize", "emb": "materialize"}


@pytest.mark.parametrize("norm_method", ["auto", "ghost", "direct", "materialize", "per-layer"])
def test_every_strategy_releases_the_clipped_sum(norm_method):
    """The released gradient and norms equal the batch-of-one oracle (fp64, 1e-10) whichever way each
    layer's norm and clipped sum are computed, with clipping active (C = the median norm)."""
    torch.manual_seed(4)
    model = Blocks()
    inputs = _data(4, seed=5)
    K = 2
    rows_fn = rows_fn_for(K)
    _, norms = clipped_sum_oracle(model, rows_fn, inputs, K, C=1e9)
    C = norms.median().item()
    want, _ = clipped_sum_oracle(model, rows_fn, inputs, K, C)
    got, got_norms = released_grads(model, rows_fn, inputs, K=K, C=C, reduction="sum",
                                    norm_method=PER_LAYER if norm_method == "per-layer" else norm_method)
    torch.testing.assert_close(got_norms, norms, rtol=1e-10, atol=0)
    _assert_close(got, want)
    taken = {d["layer"]: d["strategy"] for d in LAST_PLAN}
    if norm_method == "per-layer":
        assert {n: taken[n] for n in PER_LAYER} == PER_LAYER
    elif norm_method != "auto":  # norm layers and embeddings have one norm of their own: "direct"
        two_forms = {d["layer"] for d in LAST_PLAN if d["rule"] in ("LinearRule", "ConvRule")}
        assert all(s == (norm_method if n in two_forms or norm_method == "materialize" else "direct")
                   for n, s in taken.items()), taken
    else:
        assert set(taken.values()) <= {"ghost", "direct", "materialize"} and len(taken) == 13  # the single-site layers


@pytest.mark.parametrize("variant", ["rows", "samples", "each"])
@pytest.mark.parametrize("K", [1, 3])
def test_each_way_of_forming_conv_per_sample_grads_releases_the_clipped_sum(variant, K, monkeypatch):
    """Materialized convolutions (plain, strided, dilated, grouped, transposed) with each variant of
    ConvRule.psg_variants as the only one, K = 1 and 3, against the fp64 oracle."""
    from dpfast.rules.conv import ConvRule

    orig = ConvRule.psg_variants
    monkeypatch.setattr(ConvRule, "psg_variants", lambda self, site, tape: tuple(
        v for v in orig(self, site, tape) if v == variant) or orig(self, site, tape))
    torch.manual_seed(6)
    model = Blocks()
    inputs = _data(3, seed=7)
    rows_fn = rows_fn_for(K)
    _, norms = clipped_sum_oracle(model, rows_fn, inputs, K, C=1e9)
    C = norms.median().item()
    want, _ = clipped_sum_oracle(model, rows_fn, inputs, K, C)
    got, got_norms = released_grads(model, rows_fn, inputs, K=K, C=C, reduction="sum", norm_method="materialize")
    torch.testing.assert_close(got_norms, norms, rtol=1e-10, atol=0)
    _assert_close(got, want)
    convs = {d["layer"]: d["variant"] for d in LAST_PLAN if d["rule"] == "ConvRule"}
    assert convs and all(v in (variant, "rows") for v in convs.values()), convs
    assert (variant in convs.values()) == (K > 1 or variant == "rows"), convs  # K = 1 has one way (off the kernel)


@pytest.mark.parametrize("method", ["direct", "ghost", "materialize"])
def test_norm_methods_agree(method, monkeypatch):
    torch.manual_seed(2)
    model = Blocks()
    inputs = _data(3)
    rows_fn = rows_fn_for(2)
    m = copy.deepcopy(model)
    engine = PrivacyEngine(accountant="rdp", seed=0)
    m, o, _ = engine.make_private(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.0),
                                  noise_multiplier=0.0, max_grad_norm=1.0, multiplicity=2,
                                  expected_batch_size=3, norm_method=method, backend="torch")
    rows_fn(m, *inputs).mean().backward()
    o.step()
    _, norms = clipped_sum_oracle(model, rows_fn, inputs, 2, C=1e9)
    torch.testing.assert_close(o.last_norms, norms, rtol=1e-10, atol=0)


def test_shared_weights_and_module_called_twice():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight  # tied
            self.conv = nn.Conv1d(2, 2, 3, padding=1)

        def forward(self, x):
            h = self.conv(self.conv(x))      # called twice
            h = h.flatten(1)
            return self.b(torch.tanh(self.a(h)))

    torch.manual_seed(3)
    model = Tied()
    x = torch.randn(5, 2, 2)
    rows_fn = lambda m, x: m(x).square().mean(1)
    _, norms = clipped_sum_oracle(model, rows_fn, (x,), 1, C=1e9)
    C = norms.median().item()
    want, _ = clipped_sum_oracle(model, rows_fn, (x,), 1, C)
    got, got_norms = released_grads(model, rows_fn, (x,), K=1, C=C, reduction="sum")
    torch.testing.assert_close(got_norms, norms, rtol=1e-10, atol=0)
    _assert_close(got, want)


@pytest.mark.parametrize("opt_name", ["adam", "adamw"])
def test_adam_param_groups_match_reference(opt_name):
    torch.manual_seed(4)
    model = Blocks()
    inputs = _data(4)
    rows_fn = rows_fn_for(1)
    C = 0.05
    want, _ = clipped_sum_oracle(model, rows_fn, inputs, 1, C)
    ref = copy.deepcopy(model)
    make = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[opt_name]

    def groups(m):
        convs = [p for n, p in m.named_parameters() if "conv" in n]
        rest = [p for n, p in m.named_parameters() if "conv" not in n]
        return [{"params": convs, "lr": 1e-2}, {"params": rest, "lr": 3e-3}]

    ref_opt = make(groups(ref), weight_decay=0.01)
    for n, p in ref.named_parameters():
        p.grad = want[n] / 4
    ref_opt.step()
    m = copy.deepcopy(model)
    engine = PrivacyEngine(accountant="rdp", seed=0)
    m, o, _ = engine.make_private(module=m, optimizer=make(groups(m), weight_decay=0.01), noise_multiplier=0.0,
                                  max_grad_norm=C, expected_batch_size=4, backend="torch")
    o.zero_grad()
    rows_fn(m, *inputs).mean().backward()
    o.step()
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_frozen_parameters_are_skipped():
    torch.manual_seed(5)
    model = Blocks()
    for n, p in model.named_parameters():
        if not n.startswith("mha"):
            p.requires_grad_(False)
    inputs = _data(3)
    rows_fn = rows_fn_for(1)
    want, _ = clipped_sum_oracle(model, rows_fn, inputs, 1, C=0.1)
    got, _ = released_grads(model, rows_fn, inputs, K=1, C=0.1, reduction="sum")
    _assert_close({n: got[n] for n in want}, want)
    pm_layers = dpfast.check_module(model)
    assert pm_layers == ["mha"]


class _GroupNormNet(nn.Module):
    """conv (or linear) -> GroupNorm -> head; ``offset`` shifts the normalised input's mean."""

    def __init__(self, case):
        super().__init__()
        self.flat = case == "2d"
        self.inp = nn.Linear(4, 6) if self.flat else nn.Conv2d(3, 6, 3, padding=1)
        self.gn = nn.GroupNorm(3, 6)
        self.head = nn.Linear(6, 2) if self.flat else nn.Conv2d(6, 2, 1)
        self.offset = 5.0 if case == "offset" else 0.0
        with torch.no_grad():  # away from the initial 1 / 0, so a swapped w/b or a dropped rstd shows
            self.gn.weight.uniform_(0.5, 1.5)
            self.gn.bias.uniform_(-0.5, 0.5)
        if case == "frozen-weight":
            self.gn.weight.requires_grad_(False)
        if case == "frozen-bias":
            self.gn.bias.requires_grad_(False)

    def forward(self, x):
        h = self.gn(self.inp(x) + self.offset)
        return self.head(F.silu(h))


@pytest.mark.parametrize("case", ["plain", "frozen-weight", "frozen-bias", "2d", "channels-last", "offset"])
@pytest.mark.parametrize("K", [1, 3])
def test_fused_group_norm_per_sample_grads_match_the_oracle(case, K):
    """The fused GroupNorm's per-row affine gradients ((sum G x - sum G * mean) * rstd) against the
    batch-of-one oracle, in fp64 to 1e-10, and in fp32 with the input's mean 5 std away (the formula
    subtracts two near-equal terms) to 1e-4 of the fp64 answer."""
    torch.manual_seed(3)
    model = _GroupNormNet(case)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 4, generator=g) if case == "2d" else torch.randn(4, 3, 5, 5, generator=g)
    noise = torch.randn(4, K, *x.shape[1:], generator=g)

    def rows_fn(m, x, noise):
        xr = x.repeat_interleave(K, 0) + 0.3 * noise.flatten(0, 1)
        return m(xr).square().flatten(1).mean(1)

    _, norms = clipped_sum_oracle(model, rows_fn, (x, noise), K, C=1e9)
    C = norms.median().item()
    want, _ = clipped_sum_oracle(model, rows_fn, (x, noise), K, C)
    if case == "offset":  # fp32 engine against the fp64 oracle
        got, got_norms = released_grads(model.float(), rows_fn, (x.float(), noise.float()), K=K, C=C,
                                        reduction="sum")
        torch.testing.assert_close(got_norms.double(), norms, rtol=1e-4, atol=0)
        _assert_close({n: t.double() for n, t in got.items()}, want, rtol=1e-4)
        return
    got, got_norms = released_grads(model, rows_fn, (x, noise), K=K, C=C, reduction="sum",
                                    channels_last=case == "channels-last")
    torch.testing.assert_close(got_norms, norms, rtol=1e-10, atol=0)
    _assert_close(got, want)
    assert {d["layer"]: d["rule"] for d in LAST_PLAN}["gn"] == "GroupNormRule"
