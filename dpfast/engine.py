"""PrivacyEngine: the Opacus-style entry point (make_private, make_private_with_epsilon, get_epsilon)."""
from __future__ import annotations

import math
import os
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader

from .data import DPDataLoader
from .errors import DPError
from .optimizer import DPOptimizer
from .private_module import PrivateModule

_MODES = ("bk", "two-pass")
_BACKENDS = ("torch", "triton", "auto")


class PrivacyEngine:
    """Makes a (module, optimizer, data loader) triple private and accounts for the privacy spent.

    ``seed`` keys the Poisson sampler and the noise (Philox); it defaults to 64 random bits from the OS.
    Anyone who knows the seed can reproduce the noise: keep it (and the checkpoints holding it) secret.
    """

    def __init__(self, accountant: str = "prv", seed: int | None = None):
        from .accounting import Accountant

        self.accountant = Accountant.create(accountant)
        self.accountant_kind = accountant
        self.seed = int.from_bytes(os.urandom(8), "little") if seed is None else int(seed) % (1 << 64)
        self._seed_given = seed is not None  # distributed: an OS-drawn seed is replaced by rank 0's
        self.optimizer: DPOptimizer | None = None
        self.loader: DPDataLoader | None = None
        self.private_module: PrivateModule | None = None
        self.noise_multiplier: float | None = None
        self.sample_rate: float | None = None
        self.distributed = None
        self._no_privacy = False        # a step was released without noise: epsilon is infinite
        self._pending_state = None      # load_state_dict before make_private: applied by make_private

    # ------------------------------------------------------------------ make_private
    def make_private(self, *, module: nn.Module, optimizer: torch.optim.Optimizer,
                     data_loader: DataLoader | None = None, noise_multiplier: float, max_grad_norm: float,
                     multiplicity: int = 1, poisson_sampling: bool = True,
                     max_physical_batch_size: int | None = None, loss_reduction: str = "mean",
                     mode: str = "bk", backend: str = "auto", expected_batch_size: float | None = None,
                     sample_rate: float | None = None, nonfinite: str = "raise", norm_method: str = "auto"):
        """Returns ``(module, optimizer, data_loader)``: the same module (made private in place), a
        DPOptimizer wrapping ``optimizer``, and a Poisson-sampling loader over ``data_loader``'s dataset."""
        _check_number("noise_multiplier", noise_multiplier, lo=0.0, lo_open=False)
        _check_number("max_grad_norm", max_grad_norm, lo=0.0, lo_open=True)
        if not isinstance(multiplicity, int) or multiplicity < 1:
            raise ValueError(f"multiplicity must be an int >= 1, got {multiplicity!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if nonfinite not in ("raise", "zero"):
            raise ValueError(f"nonfinite must be 'raise' or 'zero', got {nonfinite!r}")
        if norm_method not in ("auto", "direct", "ghost"):
            raise ValueError(f"norm_method must be 'auto', 'direct' or 'ghost', got {norm_method!r}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, DPOptimizer):
            raise DPError("optimizer is already a DPOptimizer; pass the original torch optimizer")
        if self.optimizer is not None:
            raise DPError("this PrivacyEngine already made a model private; use one engine per model")
        if backend == "triton":
            from .rules.backends import resolve_backend

            resolve_backend("triton", torch.device("cpu"))  # fails early with an actionable message

        from .distributed import DistributedContext, unwrap_ddp

        module, ddp = unwrap_ddp(module)
        self.distributed = DistributedContext.detect(ddp)
        names = {id(p): n for n, p in module.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in names:
                    raise DPError("the optimizer holds a trainable parameter that is not part of the module "
                                  f"(shape {tuple(p.shape)}); dpfast can only clip gradients of the module's "
                                  "parameters")
        if self.distributed is not None:
            # Distributed: membership and noise are keyed on the seed, and every rank applies the same
            # update, so all ranks need rank 0's seed and parameters (DDP already broadcast the latter).
            self.seed = self.distributed.agree_seed(self.seed, given=self._seed_given)
            if ddp is None:
                self.distributed.broadcast_module_(module)

        pm = PrivateModule(module, multiplicity=multiplicity, mode=mode, backend=backend,
                           norm_method=norm_method)
        loader = None
        if data_loader is not None:
            dataset = data_loader.dataset
            n = len(dataset)
            batch_size = data_loader.batch_size
            if batch_size is None:
                batch_size = getattr(data_loader.batch_sampler, "batch_size", None)
            if not batch_size:
                raise DPError("data_loader has no batch_size; dpfast uses it as the expected logical batch")
            world = self.distributed.world_size if self.distributed else 1
            rank = self.distributed.rank if self.distributed else 0
            if self.distributed is not None:
                # the loader's batch_size is per rank, as for non-private DDP training
                batch_size *= world
            sample_rate = sample_rate or min(1.0, batch_size / n)
            expected_batch_size = sample_rate * n
            steps_per_epoch = max(1, round(1 / sample_rate))
            if not poisson_sampling:
                warnings.warn("poisson_sampling=False: batches are still drawn by dpfast's Poisson sampler, "
                              "because the accountant's guarantee holds only for Poisson sampling", stacklevel=2)
            loader = DPDataLoader(dataset, sample_rate=sample_rate, seed=self.seed,
                                  steps_per_epoch=steps_per_epoch,
                                  max_physical_batch_size=max_physical_batch_size,
                                  collate_fn=data_loader.collate_fn, num_workers=data_loader.num_workers,
                                  pin_memory=data_loader.pin_memory, worker_init_fn=data_loader.worker_init_fn,
                                  rank=rank, world_size=world)
        elif expected_batch_size is None and loss_reduction == "mean":
            raise DPError("without a data_loader, pass expected_batch_size (the logical batch size) so the "
                          "noisy sum can be divided by it")
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = sample_rate
        if noise_multiplier == 0:
            warnings.warn("noise_multiplier=0: gradients are clipped but not noised, so training is NOT "
                          "differentially private; get_epsilon() will report infinity", stacklevel=2)
        dp_opt = DPOptimizer(optimizer, pm, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                             expected_batch_size=expected_batch_size, loss_reduction=loss_reduction,
                             seed=self.seed, on_logical_step=self._on_logical_step, nonfinite=nonfinite,
                             distributed=self.distributed, param_names=names)
        if loader is not None:
            loader.optimizer = dp_opt
            dp_opt.data_loader_attached = True
        self.optimizer, self.loader, self.private_module = dp_opt, loader, pm
        pending = self._pending_state
        if pending is not None:  # load_state_dict ran before make_private: resume where it left off
            self._pending_state = None
            self._apply_progress(pending)
        return (ddp if ddp is not None else module), dp_opt, loader

    def make_private_with_epsilon(self, *, module, optimizer, data_loader, target_epsilon: float,
                                  target_delta: float, epochs: float | None = None, steps: int | None = None,
                                  **kwargs):
        """Like make_private, with the smallest noise multiplier whose epsilon after ``epochs`` (or
        ``steps``) logical steps is at most ``target_epsilon`` (upper bound of the accountant)."""
        from .accounting import calibrate_noise_multiplier
        from .distributed import world_size_of

        if "noise_multiplier" in kwargs:
            raise TypeError("make_private_with_epsilon chooses noise_multiplier itself; do not pass it")
        if (epochs is None) == (steps is None):
            raise ValueError("pass exactly one of epochs or steps")
        n = len(data_loader.dataset)
        batch_size = data_loader.batch_size
        # distributed: the loader's batch_size is per rank (as in make_private); q is the global rate
        q = min(1.0, batch_size * world_size_of(module) / n)
        if steps is None:
            steps = int(math.ceil(epochs * max(1, round(1 / q))))
        sigma = calibrate_noise_multiplier(target_epsilon, target_delta, q, steps=steps,
                                           accountant=self.accountant_kind, history=self.accountant.history)
        return self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                 noise_multiplier=sigma, sample_rate=q, **kwargs)

    # ------------------------------------------------------------------ accounting
    def _on_logical_step(self) -> None:
        if self.sample_rate is None:
            return
        if self.noise_multiplier == 0:
            self._no_privacy = True  # no noise: no guarantee; get_epsilon reports infinity
            return
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=1)

    @property
    def steps(self) -> int:
        return self.optimizer.steps if self.optimizer is not None else 0

    def get_epsilon(self, delta: float) -> float:
        """Upper bound on epsilon spent so far (add/remove-one adjacency)."""
        if self.optimizer is not None and self.optimizer.steps and self.sample_rate is None:
            raise DPError("the sampling rate is unknown (no data_loader and no sample_rate given to "
                          "make_private), so the privacy spent cannot be accounted")
        if self._no_privacy:
            return math.inf
        return self.accountant.get_epsilon(delta)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        if self.steps and self.sample_rate is None and not self._no_privacy:
            raise DPError("cannot checkpoint the privacy state: steps were taken with an unknown sampling "
                          "rate (no data_loader and no sample_rate given to make_private), so the privacy "
                          "spent is unknown")
        return {
            "version": 1,
            "seed": self.seed,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "accountant": self.accountant.state_dict(),
            "sampler": self.loader.state_dict() if self.loader is not None else None,
            "no_privacy": self._no_privacy,
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("version") != 1:
            raise ValueError(f"unknown PrivacyEngine state version {sd.get('version')!r}")
        if self.optimizer is not None and sd["seed"] != self.seed:
            raise ValueError("checkpoint was made with another seed: build the engine with "
                             "PrivacyEngine(seed=...) from the checkpoint, or load before make_private")
        self.seed = sd["seed"]
        self._seed_given = True
        self._refuse_if_behind(sd)
        self.accountant.load_state_dict(sd["accountant"])
        # a release without noise can never be undone by loading a private checkpoint
        self._no_privacy = self._no_privacy or bool(sd.get("no_privacy", False))
        if self.optimizer is None:
            self._pending_state = sd  # applied by make_private: steps and sampler position
            return
        self._apply_progress(sd)

    def _refuse_if_behind(self, sd: dict) -> None:
        """A checkpoint behind what this engine already released would forget spent privacy and make
        the next releases reuse (seed, step) noise keys: refuse it."""
        spent = sum(int(n) for *_, n in sd["accountant"].get("history", []))
        behind = [spent < self.accountant.steps]
        if self.optimizer is not None:
            behind.append(int(sd["steps"]) < self.optimizer.steps)
        if self.loader is not None and sd.get("sampler") is not None:
            behind.append(int(sd["sampler"]["step"]) < self.loader.step)
        if any(behind):
            raise ValueError(
                f"this checkpoint is at step {sd['steps']} but this engine has already released "
                f"{self.steps} steps: loading it would forget privacy already spent and reuse noise keys. "
                "To roll a run back, load the checkpoint into a new PrivacyEngine in a new process")

    def _apply_progress(self, sd: dict) -> None:
        self.optimizer.steps = int(sd["steps"])
        self.optimizer.seed = self.seed
        if self.loader is not None and sd["sampler"] is not None:
            self.loader.load_state_dict(sd["sampler"])


def _check_number(name, value, lo, lo_open):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < lo or (lo_open and value == lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
