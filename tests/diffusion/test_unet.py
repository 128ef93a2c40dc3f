"""DDPM++ U-Net: shapes, DPDM's parameter count, per-sample independence, engine compatibility."""
import pytest
import torch

from dpfast.diffusion.unet import DDPMpp, count_parameters

TINY = dict(image_size=8, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))


def test_dpdm_size_for_28x28():
    # DPDM reports ~1.75M parameters for nf=32, ch_mult (1, 2, 2), 2 res blocks, attention at 7.
    model = DDPMpp(image_size=28, in_channels=1, num_classes=10)
    assert count_parameters(model) == 1_753_345
    assert abs(count_parameters(model) - 1.75e6) / 1.75e6 < 0.01


@pytest.mark.parametrize("kw, shape", [
    (dict(image_size=28, nf=8, num_res_blocks=1), (3, 1, 28, 28)),
    (dict(image_size=32, in_channels=3, nf=8, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,),
          num_classes=0), (2, 3, 32, 32)),
    (dict(TINY, embedding_type="fourier", num_classes=5), (1, 1, 8, 8)),
])
def test_output_shape(kw, shape):
    torch.manual_seed(0)
    model = DDPMpp(**kw)
    labels = torch.zeros(shape[0], dtype=torch.long) if model.num_classes else None
    out = model(torch.randn(shape), torch.randn(shape[0]), labels)
    assert out.shape == shape and torch.isfinite(out).all()


def _randomise_output_layers(model):
    # zero-initialised output layers would hide dependencies; give every weight a nonzero value
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))


def test_rows_are_independent():
    """Output row i depends only on input row i (no op mixes samples), checked on the Jacobian."""
    torch.manual_seed(0)
    model = DDPMpp(**TINY, num_classes=3).double()
    _randomise_output_layers(model)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, dtype=torch.float64)
    y = torch.tensor([0, 1, 3])  # 3 is the null label
    out = model(x, c, y)
    for i in range(3):
        (g,) = torch.autograd.grad(out[i].sum(), x, retain_graph=True)
        assert g[i].abs().sum() > 0
        assert all(g[j].abs().max() == 0 for j in range(3) if j != i)
    # and a row computed alone equals the row computed in a batch
    alone = model(x[1:2], c[1:2], y[1:2])
    torch.testing.assert_close(alone, out[1:2], rtol=1e-10, atol=1e-12)


def test_labels_change_the_output_and_default_to_null():
    torch.manual_seed(0)
    model = DDPMpp(**TINY, num_classes=3)
    _randomise_output_layers(model)
    x, c = torch.randn(2, 1, 8, 8), torch.randn(2)
    a = model(x, c, torch.tensor([0, 0]))
    b = model(x, c, torch.tensor([1, 1]))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(model(x, c, None), model(x, c, torch.tensor([3, 3])))


def test_engine_accepts_every_layer():
    from dpfast import check_module

    model = DDPMpp(image_size=28, num_classes=10)
    names = check_module(model)
    n_trainable = sum(1 for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False)))
    assert len(names) == n_trainable
