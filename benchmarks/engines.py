"""Engine adapters: one training step of each DP library, behind one interface.

An adapter is built fresh for every measured row and used as::

    adapter.setup(model, optimizer, batch, dtype, multiplicity)  # wrap model/optimizer
    adapter.step()          # one full optimizer step on batch.rows = B*K rows
    adapter.norm_share()    # fraction of the step in per-sample norms, if the engine reports it
    adapter.teardown()      # drop references so memory can be freed before the next row

Every engine runs the same workload (``models.DiffusionBatch``: DDPM epsilon MSE per row, Adam)
at the same precision (``fp32``, or ``bf16`` autocast as a non-private user would run it).
An optional library that is not installed raises :class:`EngineUnavailable` in ``setup``; the
harness turns that, and any other failure, into a row that carries the error.
"""
from __future__ import annotations

import contextlib
import fnmatch
import warnings
from typing import Callable, Dict, Optional

import torch

NOISE_MULTIPLIER = 1.0  # sigma and C only change numbers, not cost; fixed so rows compare
MAX_GRAD_NORM = 1.0
DTYPES = ("fp32", "bf16")


class EngineUnavailable(RuntimeError):
    """The engine cannot run here (package not installed, needs a GPU, ...). Not a failure."""


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown dtype {dtype!r}; choose from {DTYPES}")


class Engine:
    name = "engine"
    note = ""  # caveat printed in the row, e.g. what the engine clips
    computes_norms = False  # True: the harness reports the share of the step spent in norms

    def setup(self, model, optimizer, batch, dtype: str, multiplicity: int) -> None:
        self.model, self.optimizer, self.batch, self.dtype = model, optimizer, batch, dtype
        self.multiplicity = multiplicity
        self.device = batch.device

    def forward_rows(self):
        """Draws timesteps and noise, runs the model at the row's precision, and returns
        ``(eps_pred, eps)``, both ``(B*K, C, H, W)``; ``batch.loss_rows`` turns them into losses."""
        x_t, t, eps = self.batch.sample()
        with autocast(self.device, self.dtype):
            eps_pred = self.model(x_t, t)
        return eps_pred, eps

    def step(self) -> None:
        raise NotImplementedError

    def norm_share(self) -> Optional[float]:
        return None

    def teardown(self) -> None:
        # Engines wrap the model (hooks, closures over parameters); dropping every reference is
        # what lets the next row start from an empty GPU.
        self.__dict__.clear()


class NonPrivate(Engine):
    name = "non-private"

    def step(self):
        self.optimizer.zero_grad(set_to_none=True)
        eps_pred, eps = self.forward_rows()
        self.batch.loss_rows(eps_pred, eps).mean().backward()
        self.optimizer.step()


class Dpfast(Engine):
    """dpfast through its public API, with no data loader: every ``step()`` is one logical batch of
    expected size B, and the engine groups the B*K rows into B samples (multiplicity)."""

    computes_norms = True

    def __init__(self, mode: str, backend: str):
        self.mode, self.backend = mode, backend
        self.name = f"dpfast-{mode}-{backend}"

    def setup(self, model, optimizer, batch, dtype, multiplicity):
        super().setup(model, optimizer, batch, dtype, multiplicity)
        try:
            from dpfast import PrivacyEngine
        except ImportError as e:
            raise EngineUnavailable(f"dpfast.PrivacyEngine is not importable ({e})") from e
        if self.backend == "triton" and self.device.type != "cuda":
            raise EngineUnavailable("the triton backend needs a CUDA GPU")
        self.engine = PrivacyEngine(accountant="prv", seed=0)
        self.model, self.optimizer, _ = self.engine.make_private(
            module=model, optimizer=optimizer, data_loader=None,
            noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
            multiplicity=multiplicity, poisson_sampling=False, expected_batch_size=batch.batch_size,
            loss_reduction="mean", mode=self.mode, backend=self.backend)

    step = NonPrivate.step  # the point of the API: the training loop does not change

    def norm_share(self):
        return profile_norm_share(getattr(self.engine, "profile", None))


def profile_norm_share(profile) -> Optional[float]:
    """Reads the norm share from ``engine.profile`` if the engine exposes one: either a
    ``norm_share`` value, or norm and step times under ``norm_*`` / ``step_*`` keys or attributes."""
    if profile is None:
        return None
    get = profile.get if isinstance(profile, dict) else (lambda k, d=None: getattr(profile, k, d))
    share = get("norm_share", None)
    if share is not None:
        return float(share)
    for unit in ("s", "ms", "us"):
        norm, step = get(f"norm_{unit}", None), get(f"step_{unit}", None)
        if norm is not None and step:
            return float(norm) / float(step)
    return None


class _RowMSE(torch.nn.Module):
    """A criterion Opacus' ghost wrapper can drive: it flips ``reduction`` to ``"none"`` and
    expects one loss per row back."""

    def __init__(self):
        super().__init__()
        self.reduction = "mean"

    def forward(self, eps_pred, eps):
        from .models import DiffusionBatch
        rows = DiffusionBatch.loss_rows(eps_pred, eps)
        return rows if self.reduction == "none" else rows.mean()


class Opacus(Engine):
    """Opacus 1.x, ``grad_sample_mode`` "hooks" (materialises per-row gradients) or "ghost" (ghost
    clipping for Linear/Embedding, two backward passes). Opacus has no notion of multiplicity:
    with K > 1 it clips each of the B*K rows, which costs what DPDM's Opacus fork costs."""

    def __init__(self, grad_sample_mode: str):
        self.grad_sample_mode = grad_sample_mode
        self.name = f"opacus-{grad_sample_mode}"

    def setup(self, model, optimizer, batch, dtype, multiplicity):
        super().setup(model, optimizer, batch, dtype, multiplicity)
        try:
            import opacus
        except ImportError as e:
            raise EngineUnavailable(f"opacus is not installed ({e}); pip install opacus") from e
        if multiplicity > 1:
            self.note = "clips each of the B*K rows (no multiplicity in Opacus)"
        # Opacus derives its expected batch size from the loader: one batch of all rows.
        rows = torch.utils.data.TensorDataset(torch.arange(batch.rows))
        loader = torch.utils.data.DataLoader(rows, batch_size=batch.rows)
        with warnings.catch_warnings():  # "Secure RNG turned off": expected when benchmarking
            warnings.simplefilter("ignore", UserWarning)
            engine = opacus.PrivacyEngine(accountant="rdp")
        kwargs = dict(module=model, optimizer=optimizer, data_loader=loader,
                      noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
                      poisson_sampling=False, loss_reduction="mean",
                      grad_sample_mode=self.grad_sample_mode)
        if self.grad_sample_mode == "ghost":
            # Ghost mode returns a criterion wrapper whose loss.backward() runs both passes.
            self.model, self.optimizer, self.criterion, _ = engine.make_private(criterion=_RowMSE(), **kwargs)
        else:
            self.model, self.optimizer, _ = engine.make_private(**kwargs)

    def step(self):
        self.optimizer.zero_grad(set_to_none=True)
        eps_pred, eps = self.forward_rows()
        with warnings.catch_warnings():  # Opacus' hooks warn on every backward; noise, not news
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            if self.grad_sample_mode == "ghost":
                self.criterion(eps_pred, eps).backward()
            else:
                self.batch.loss_rows(eps_pred, eps).mean().backward()
        self.optimizer.step()


class FuncVmap(Engine):
    """torch.func: ``vmap(grad(...))`` over samples, each sample's K rows in one call, so a sample's
    gradient is the mean over its rows before clipping. Materialises B x P gradients."""

    name = "vmap"

    def setup(self, model, optimizer, batch, dtype, multiplicity):
        super().setup(model, optimizer, batch, dtype, multiplicity)
        try:
            from torch.func import functional_call, grad, vmap
        except ImportError as e:
            raise EngineUnavailable(f"torch.func is not available ({e})") from e
        # Detached views share storage with the parameters, so Adam's in-place updates show up.
        self.params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
        self.live = dict((k, p) for k, p in model.named_parameters() if p.requires_grad)
        buffers = {k: b.detach() for k, b in model.named_buffers()}
        loss_rows = batch.loss_rows

        def sample_loss(params, x_t, t, eps):  # x_t: (K, C, H, W), the rows of one sample
            eps_pred = functional_call(model, (params, buffers), (x_t, t))
            return loss_rows(eps_pred, eps).mean()

        self.per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0, 0))

    def step(self):
        B, K = self.batch.batch_size, self.multiplicity
        x_t, t, eps = self.batch.sample()
        with autocast(self.device, self.dtype):
            grads = self.per_sample_grads(self.params, x_t.unflatten(0, (B, K)),
                                          t.unflatten(0, (B, K)), eps.unflatten(0, (B, K)))
        sq = sum(g.float().flatten(1).pow(2).sum(1) for g in grads.values())
        clip_factors = (MAX_GRAD_NORM / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for k, g in grads.items():
            p = self.live[k]
            clipped_sum = torch.einsum("b,b...->...", clip_factors.to(g.dtype), g).to(p.dtype)
            p.grad = (clipped_sum + NOISE_MULTIPLIER * MAX_GRAD_NORM * torch.randn_like(p)) / B
        del grads
        self.optimizer.step()


# name -> factory. Tests and users may add their own through register().
ENGINES: Dict[str, Callable[[], Engine]] = {
    "non-private": NonPrivate,
    "dpfast-bk-torch": lambda: Dpfast("bk", "torch"),
    "dpfast-bk-triton": lambda: Dpfast("bk", "triton"),
    "dpfast-two-pass-torch": lambda: Dpfast("two-pass", "torch"),
    "dpfast-two-pass-triton": lambda: Dpfast("two-pass", "triton"),
    "opacus-hooks": lambda: Opacus("hooks"),
    "opacus-ghost": lambda: Opacus("ghost"),
    "vmap": FuncVmap,
}
BASELINE = "non-private"


def register(name: str, factory: Callable[[], Engine]) -> None:
    ENGINES[name] = factory


def make_engine(name: str) -> Engine:
    engine = ENGINES[name]()
    engine.name = name
    return engine


def resolve_engines(spec: str) -> list:
    """``"all"`` or a comma list of names / globs (``dpfast-*``). The non-private baseline is always
    included, first: every ratio is taken against it in the same run."""
    names = []
    for pattern in [s.strip() for s in spec.split(",") if s.strip()]:
        matched = list(ENGINES) if pattern == "all" else fnmatch.filter(ENGINES, pattern)
        if not matched:
            raise ValueError(f"no engine matches {pattern!r}; known: {', '.join(ENGINES)}")
        names += [m for m in matched if m not in names]
    return [BASELINE] + [n for n in names if n != BASELINE]
