"""Independent oracle for tests: per-sample gradients by a batch-of-one loop (no dpfast code)."""
from __future__ import annotations

import torch


def clipped_sum_oracle(model, rows_fn, inputs, K, C, params=None):
    """sum_i clip(g_i, C) where g_i is the gradient of the MEAN of sample i's K row losses.

    rows_fn(model, *sample_inputs) -> per-row losses of those samples (len = samples*K); ``inputs`` is
    a tuple of tensors whose dim 0 indexes samples. Returns ({name: tensor}, per-sample norms)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad] if params is None else params
    B = inputs[0].shape[0]
    total = {n: torch.zeros_like(p) for n, p in named}
    norms = []
    for i in range(B):
        sample = tuple(t[i:i + 1] for t in inputs)
        loss = rows_fn(model, *sample)
        assert loss.shape == (K,)
        grads = torch.autograd.grad(loss.mean(), [p for _, p in named], allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, (_, p) in zip(grads, named)]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        norms.append(norm)
        c = min(1.0, C / (norm.item() + 1e-6))
        for (n, _), g in zip(named, grads):
            total[n] += c * g
    return total, torch.stack(norms) if norms else torch.zeros(0)
