"""PrivacyEngine: the Opacus-style entry point (make_private, make_private_with_epsilon, get_epsilon)."""
from __future__ import annotations

import math
import os
import warnings
import weakref

import torch
from torch import nn
from torch.utils.data import DataLoader

from .data import DPDataLoader
from .errors import DPError
from .optimizer import DPOptimizer
from .private_module import PrivateModule

_MODES = ("bk", "two-pass")
_ENGINES: "weakref.WeakSet[PrivacyEngine]" = weakref.WeakSet()  # rekeyed in a forked child (_rekey_copy)


def _rekey_after_fork() -> None:
    for engine in list(_ENGINES):
        if "_calibrated" not in engine.__dict__:  # its __init__ raised: never usable
            continue
        try:
            if engine.optimizer is not None:  # its loader and optimizer hold the parent's keys
                engine._forked_running = True
            engine._rekey_copy()
        except Exception:  # noqa: BLE001 - one engine must not stop the others' rekeying
            engine._forked_running = True  # not rekeyed: it may never release in this child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_rekey_after_fork)
_BACKENDS = ("torch", "triton", "auto")


class PrivacyEngine:
    """Makes a (module, optimizer, data loader) triple private and accounts for the privacy spent.

    ``seed`` keys the Poisson sampler and the noise (Philox); it defaults to 64 random bits from the OS.
    Anyone who knows the seed can reproduce the noise: keep it (and the checkpoints holding it) secret.

    ``ledger``: a file (JSON lines, see dpfast.ledger) to which every release is appended, durably,
    before it happens. Keep it next to the checkpoints: loading an earlier checkpoint then charges the
    steps released after it and continues with fresh noise keys and batches, instead of forgetting them.

    ``secure_mode=True``: Poisson membership and noise come from ChaCha20 keyed by 256 bits from the
    OS (never written to a checkpoint: a resumed run draws a new key, so fresh noise and batches), and
    the noise is an exact discrete Gaussian on a power-of-two grid, immune to the floating-point
    attacks on Box-Muller/log-based samplers (Jin et al. 2022). The accountant charges the slightly
    smaller effective noise multiplier of the grid (dpfast.random_secure.secure_noise_multiplier).
    Its finalize runs at 0.03-0.04x Philox's throughput on CPU (benchmarks/results/finalize_noise.md).

    Fresh keys on every resume. The noise and the Poisson batches are keyed by ``key_seed`` (the seed,
    until the first resume) and the step. :meth:`load_state_dict` draws a new, secret ``key_seed`` (:meth:`_resume_key`),
    so every continuation of a checkpoint draws noise and batches independent of every other one's:
    a copied or restored run directory, a volume snapshot or a backup that fools the ledger's copy
    check (dpfast.ledger) can then never release one noise key twice (two releases of one key with
    different gradients differ by the noise-free difference of their clipped sums). A resumed run is
    therefore not bit-identical to the uninterrupted one; ``deterministic_resume=True`` keeps the
    checkpoint's key, for tests that compare the two, and is sound only if no checkpoint is ever
    continued twice (the ledger's copy check is then the only guard). Per-record training randomness
    (:meth:`record_generators`) stays keyed by the seed: it is part of each record's gradient, not of
    the mechanism.
    """

    def __init__(self, accountant: str = "prv", seed: int | None = None, ledger=None, secure_mode: bool = False,
                 adopt_copied_ledger: bool = False, deterministic_resume: bool = False):
        from .accounting import Accountant
        from .ledger import Ledger, new_run_id

        self.accountant = Accountant.create(accountant)
        self.accountant_kind = accountant
        self.seed = int.from_bytes(os.urandom(8), "little") if seed is None else int(seed) % (1 << 64)
        # the run's public name (ledger lines, optimizer stamps): random, never a function of the seed, which a
        # hash of its 64 bits gives away to 2^64 guesses (dpfast.ledger); kept in state_dict, adopted on load
        self.run_id = new_run_id()
        self._seed_given = seed is not None  # distributed: an OS-drawn seed is replaced by rank 0's
        self._key: int | None = None  # the noise and Poisson key after a resume (key_seed); None: the seed
        # secret of this engine's resumes (_resume_key), from the OS, held in memory only (rank 0's under
        # torch.distributed, agreed by make_private), and how many checkpoints this engine has loaded
        self._resume_pad = int.from_bytes(os.urandom(8), "little")
        self._loads = 0
        self._forked_running = False  # a forked copy of an engine that had run make_private (_before_step)
        self.deterministic_resume = bool(deterministic_resume)
        self.optimizer: DPOptimizer | None = None
        self.loader: DPDataLoader | None = None
        self.private_module: PrivateModule | None = None
        self._noise_multiplier: float | None = None
        self._sample_rate: float | None = None
        self.distributed = None
        self.ledger = Ledger(ledger) if ledger is not None else None
        # resume next to a ledger copied from another file (dpfast.ledger): only where the original run will
        # never continue (a move to another disk or machine); the ledger then names its new file
        self.adopt_copied_ledger = bool(adopt_copied_ledger)
        self.secure_mode = bool(secure_mode)
        self._secure_key: bytes | None = None
        if self.secure_mode:
            from .random_secure import new_key

            self._secure_key = new_key()
        self._no_privacy = False        # a release without noise, or a refused batch: epsilon is infinite
        self.why_no_privacy: str | None = None
        self._pending_state = None      # load_state_dict before make_private: applied by make_private
        self._prior: list[dict] = []    # earlier engines on the same data (compose_after)
        self._ledger_check_due = False  # make_private met a used ledger and no checkpoint yet
        self._calibrated = False        # make_private_with_epsilon chose sigma
        _ENGINES.add(self)              # last: a forked child rekeys only whole engines

    # ------------------------------------------------------------------ make_private
    def make_private(self, *, module: nn.Module, optimizer: torch.optim.Optimizer,
                     data_loader: DataLoader | None = None, noise_multiplier: float, max_grad_norm: float,
                     multiplicity: int = 1, poisson_sampling: bool = True,
                     max_physical_batch_size: int | None = None, loss_reduction: str = "mean",
                     mode: str = "bk", backend: str = "auto", expected_batch_size: float | None = None,
                     sample_rate: float | None = None, nonfinite: str = "zero", norm_method: str = "auto",
                     criterion=None, grad_sample_mode: str | None = None, clipping: str = "flat",
                     batch_first: bool = True, wrap_model: bool = True, noise_generator=None,
                     rand_on_empty: bool = False, secure_mode: bool | None = None,
                     max_materialized_bytes: int | float | None = None):
        """Returns ``(module, optimizer, data_loader)``: the same module (made private in place), a
        DPOptimizer wrapping ``optimizer``, and a Poisson-sampling loader over ``data_loader``'s dataset.

        Opacus' keywords are accepted where dpfast can honour them and refused, with the dpfast way,
        where it cannot (:func:`_opacus_keywords`). ``grad_sample_mode="ghost"`` returns Opacus' ghost
        tuple ``(module, optimizer, criterion, data_loader)``, the criterion (default cross-entropy)
        wrapped in :class:`RowReducedLoss` so that its mean is a plain mean over rows."""
        ghost = _opacus_keywords(self, max_grad_norm=max_grad_norm, criterion=criterion, loss_reduction=loss_reduction,
                                 grad_sample_mode=grad_sample_mode, clipping=clipping, batch_first=batch_first,
                                 wrap_model=wrap_model, noise_generator=noise_generator, rand_on_empty=rand_on_empty,
                                 secure_mode=secure_mode)
        _check_number("noise_multiplier", noise_multiplier, lo=0.0, lo_open=False)
        _check_number("max_grad_norm", max_grad_norm, lo=0.0, lo_open=True)
        if expected_batch_size is not None:
            _check_number("expected_batch_size", expected_batch_size, lo=0.0, lo_open=True)
        if sample_rate is not None:  # charged at every release: a rate outside (0, 1] has no accounting
            _check_number("sample_rate", sample_rate, lo=0.0, lo_open=True)
            if sample_rate > 1:
                raise ValueError(f"sample_rate must be <= 1, got {sample_rate}")
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
        from .plan import check_norm_method, resolve_extra_bytes

        check_norm_method(norm_method)
        if mode == "two-pass" and (norm_method == "materialize" or
                                   (isinstance(norm_method, dict) and "materialize" in norm_method.values())):
            raise ValueError("norm_method 'materialize' keeps per-sample gradients until the clip factors are "
                             "known, which mode='two-pass' exists to avoid: use mode='bk'")
        first = next(module.parameters(), None)
        extra = resolve_extra_bytes(max_materialized_bytes, first.device if first is not None else None)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, DPOptimizer):
            raise DPError("optimizer is already a DPOptimizer; pass the original torch optimizer")
        if self.optimizer is not None:
            raise DPError("this PrivacyEngine already made a model private; use one engine per model")
        if self.ledger is not None and self._pending_state is None:
            # a used ledger needs the state of its run: loaded before make_private, or after it (the
            # accelerate order) but before the first step(), which refuses otherwise
            self._ledger_check_due = bool(self.ledger.records())
        if backend == "triton":
            from .rules.backends import resolve_backend

            resolve_backend("triton", torch.device("cpu"))  # fails early with an actionable message

        from .distributed import DistributedContext, unwrap_ddp

        module, ddp = unwrap_ddp(module)
        if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules()):
            # the masks are drawn for the whole batch in batch order from the global RNG: with a known
            # seed, one record's presence moves every later record's mask, and the clipped sum by more
            # than C (dpfast.random.record_generators explains the argument)
            warnings.warn("the module has dropout: its masks are drawn in batch order from torch's global "
                          "RNG, so the guarantee holds only if that RNG's state is secret (a seed known to "
                          "anyone, e.g. torch.manual_seed(0), lets one record move every later record's mask); "
                          "set p=0 for private training, or seed the RNG from the OS", stacklevel=2)
        self.distributed = DistributedContext.detect(ddp)
        names = {id(p): n for n, p in module.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in names:
                    raise DPError("the optimizer holds a trainable parameter that is not part of the module "
                                  f"(shape {tuple(p.shape)}); dpfast can only clip gradients of the module's "
                                  "parameters")
        if self.secure_mode:
            if self.distributed is not None:
                raise DPError("secure_mode is not supported under torch.distributed yet (every rank would need "
                              "the same 256-bit key); run one process, or use secure_mode=False")
            wide = [names[id(p)] for g in optimizer.param_groups for p in g["params"]
                    if p.requires_grad and p.dtype == torch.float64]
            if wide:
                raise DPError(f"secure_mode releases fp32 gradients only; parameters {wide[:5]} are float64")
        if self.distributed is not None:
            # Distributed: membership and noise are keyed on the seed, and every rank applies the same
            # update, so all ranks need rank 0's seed and parameters (DDP already broadcast the latter).
            self.seed = self.distributed.agree_seed(self.seed, given=self._seed_given)
            # and name the run as rank 0 does (a 64-bit id travels as a seed does; given=False: rank 0's)
            self.run_id = f"{self.distributed.agree_seed(int(self.run_id, 16), given=False):016x}"
            # and key noise and batches as rank 0 does (its fresh key if it loaded a checkpoint already; a
            # rank that did not is stopped by the first release: its steps differ), with rank 0's secret for
            # the keys of later loads (_resume_key): every rank that loads then derives the same key
            self._key = self.distributed.agree_seed(self.key_seed, given=False)
            self._resume_pad = self.distributed.agree_seed(self._resume_pad, given=False)
            if ddp is None:
                self.distributed.broadcast_module_(module)

        pm = PrivateModule(module, multiplicity=multiplicity, mode=mode, backend=backend,
                           norm_method=norm_method, max_materialized_bytes=extra)
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
            if sample_rate and expected_batch_size is None and not 0.5 <= batch_size / (sample_rate * n) <= 2:
                warnings.warn(f"sample_rate={sample_rate} draws about {sample_rate * n:.4g} samples per step, but "
                              f"the noisy sum is divided by the loader's batch size {batch_size}: pass "
                              "expected_batch_size (a constant fixed in advance) to divide by another",
                              stacklevel=2)
            sample_rate = sample_rate or min(1.0, batch_size / n)
            # The noisy sum is divided by a constant the user chose: the loader's batch size, or
            # expected_batch_size when given; never by q x len(dataset) (Opacus' expected batch size).
            # Under add/remove adjacency, which the accountant assumes, len(dataset) differs between
            # neighbouring data sets, and a divisor computed from it is released without noise: the
            # scale of the noise in the update reads it off (tests/test_privacy_hardening.py audits a
            # loader at q = 0.5 and one other record: lower bound 4.0 against a claimed 1.0). The
            # rate q = batch_size / len(dataset) still depends on the size when sample_rate is not
            # given; the README says so, and passing sample_rate makes it public too.
            if expected_batch_size is None:
                expected_batch_size = float(batch_size)
            steps_per_epoch = max(1, round(1 / sample_rate))
            if not poisson_sampling:
                warnings.warn("poisson_sampling=False: batches are still drawn by dpfast's Poisson sampler, "
                              "because the accountant's guarantee holds only for Poisson sampling", stacklevel=2)
            loader = DPDataLoader(dataset, sample_rate=sample_rate, seed=self.key_seed,
                                  steps_per_epoch=steps_per_epoch,
                                  max_physical_batch_size=max_physical_batch_size,
                                  collate_fn=data_loader.collate_fn, num_workers=data_loader.num_workers,
                                  pin_memory=data_loader.pin_memory, worker_init_fn=data_loader.worker_init_fn,
                                  rank=rank, world_size=world, secure_key=self._secure_key)
        elif expected_batch_size is None and loss_reduction == "mean":
            raise DPError("without a data_loader, pass expected_batch_size (the logical batch size) so the "
                          "noisy sum can be divided by it")
        if self._pending_state is not None and loader is not None and self._pending_state.get("sampler") is not None:
            try:  # the loaded checkpoint must fit this loader, before the engine holds anything of this call
                loader.check_state(self._pending_state["sampler"], seed=_checkpoint_key(self._pending_state))
            except ValueError:
                pm.remove()
                raise
        self._noise_multiplier = float(noise_multiplier)
        self._sample_rate = sample_rate  # the new loader's own rate where there is one
        if loader is None and sample_rate is not None and sample_rate < 1:  # q = 1 charges every record every step
            warnings.warn(f"no data_loader: epsilon assumes that every batch you feed is a Poisson sample of the "
                          f"data set at rate {sample_rate:g} (each record in independently, with fresh coins each "
                          "step); dpfast cannot check batches it does not draw, and shuffled or fixed batches "
                          "have no such amplification (pass the data_loader to have dpfast draw them)",
                          stacklevel=2)
        if noise_multiplier == 0:
            warnings.warn("noise_multiplier=0: gradients are clipped but not noised, so training is NOT "
                          "differentially private; get_epsilon() will report infinity", stacklevel=2)
        dp_opt = DPOptimizer(optimizer, pm, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                             expected_batch_size=expected_batch_size, loss_reduction=loss_reduction,
                             seed=self.key_seed, on_release=self._charge, on_refusal=self._refused, nonfinite=nonfinite,
                             distributed=self.distributed, param_names=names, secure_key=self._secure_key,
                             run_id=self.run_id)
        dp_opt._before_step = self._before_step
        if loader is not None:
            loader.optimizer = dp_opt
            dp_opt.data_loader_attached = True
        self.optimizer, self.loader, self.private_module = dp_opt, loader, pm
        pending = self._pending_state
        if pending is not None:  # load_state_dict ran before make_private: resume where it left off
            self._pending_state = None
            self._apply_progress(pending)
        if ghost:  # Opacus' ghost tuple; its default criterion is cross-entropy
            criterion = RowReducedLoss(criterion if criterion is not None else nn.CrossEntropyLoss(), loss_reduction)
            return (ddp if ddp is not None else module), dp_opt, criterion, loader
        return (ddp if ddp is not None else module), dp_opt, loader

    def make_private_with_epsilon(self, *, module, optimizer, data_loader, target_epsilon: float,
                                  target_delta: float, epochs: float | None = None, steps: int | None = None,
                                  epsilon_tolerance: float | None = None, **kwargs):
        """Like make_private, with the smallest noise multiplier whose epsilon after ``epochs`` (or
        ``steps``) logical steps is at most ``target_epsilon`` (upper bound of the accountant).
        ``epsilon_tolerance`` (Opacus) is accepted and checked; dpfast's calibration is its own: never
        above the target, within about 1% below it. The history of engines composed before this one
        (``compose_after``) counts against the target; this run's own earlier releases (a checkpoint
        loaded before make_private) do not, so a resumed run gets the uninterrupted run's sigma, and
        ``steps`` / ``epochs`` are the whole run's. ``sample_rate``: a public rate q fixed in advance;
        by default q = batch_size / len(dataset), which makes the data set's size public (README, "The
        data set's size"): with it, sigma and the steps of an ``epochs`` budget depend on q alone."""
        if epsilon_tolerance is not None:
            _check_number("epsilon_tolerance", epsilon_tolerance, lo=0.0, lo_open=True)
        from .accounting import calibrate_noise_multiplier
        from .distributed import world_size_of

        if "noise_multiplier" in kwargs:
            raise TypeError("make_private_with_epsilon chooses noise_multiplier itself; do not pass it")
        if (epochs is None) == (steps is None):
            raise ValueError("pass exactly one of epochs or steps")
        q = kwargs.pop("sample_rate", None)
        if q is not None:
            _check_number("sample_rate", q, lo=0.0, lo_open=True)
            if q > 1:
                raise ValueError(f"sample_rate must be <= 1, got {q}")
            q = float(q)
        else:
            # distributed: the loader's batch_size is per rank (as in make_private); q is the global rate
            q = min(1.0, data_loader.batch_size * world_size_of(module) / len(data_loader.dataset))
        if steps is None:
            steps = int(math.ceil(epochs * max(1, round(1 / q))))
        # the history of the engines composed before this one (compose_after), not this run's own releases:
        # a resumed run (its state loaded before make_private) gets the sigma of the uninterrupted run
        prior, own = self.accountant.split_history(self.prior_steps)
        sigma = calibrate_noise_multiplier(target_epsilon, target_delta, q, steps=steps,
                                           accountant=self.accountant_kind, history=prior)
        done = sum(n for *_, n in own)
        if any(abs(s_ - sigma) > 1e-9 * sigma or q_ != q for s_, q_, _ in own):
            # the run's earlier part used another sigma or rate: the uninterrupted run's sigma would miss the
            # target, so calibrate what is left against the whole history
            if done >= steps:
                raise DPError(f"this run already released {done} steps, not fewer than the {steps} asked for")
            sigma = calibrate_noise_multiplier(target_epsilon, target_delta, q, steps=steps - done,
                                               accountant=self.accountant_kind, history=prior + own)
        if self.secure_mode and "max_grad_norm" in kwargs:
            # the accountant charges the grid's effective sigma, a little below the nominal one: raise the
            # nominal sigma until the charged one meets the calibrated value
            from .random_secure import nominal_noise_multiplier

            dim = sum(p.numel() for g in optimizer.param_groups for p in g["params"] if p.requires_grad)
            sigma = nominal_noise_multiplier(sigma, max(1, dim), max_grad_norm=kwargs["max_grad_norm"])
        out = self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                noise_multiplier=sigma, sample_rate=q, **kwargs)
        self._calibrated = True
        return out

    # ------------------------------------------------------------------ accounting
    @property
    def sample_rate(self) -> float | None:
        """The Poisson rate every release is charged at: the loader's, where dpfast draws the batches
        (one source of truth: the rate the batches were drawn at is the rate charged), else the one
        given to make_private (or learnt from the ledger)."""
        return self.loader.sample_rate if self.loader is not None else self._sample_rate

    @sample_rate.setter
    def sample_rate(self, q: float | None) -> None:
        if self.loader is not None and q != self.loader.sample_rate:
            raise ValueError(f"the sampling rate is the loader's ({self.loader.sample_rate}), fixed at make_private: "
                             "a rate charged other than the one batches are drawn at would make epsilon false; to "
                             "change the batch size, build a new engine that composes after this one "
                             "(PrivacyEngine.compose_after)")
        if q is not None and (isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {q!r}")
        self._sample_rate = q

    @property
    def noise_multiplier(self) -> float | None:
        """The noise multiplier of the next release: the optimizer's (one source of truth; a noise
        scheduler that sets ``optimizer.noise_multiplier`` is charged for what it set)."""
        return self.optimizer.noise_multiplier if self.optimizer is not None else self._noise_multiplier

    def _charge(self, key: int, sigma: float) -> None:
        """Called by the optimizer before release ``key`` reaches any parameter: log it, then charge it."""
        if self.secure_mode and sigma > 0:
            from .random_secure import secure_noise_multiplier

            # the grid rounding adds sqrt(dim) * grid to the sensitivity: charge the effective sigma
            sigma = secure_noise_multiplier(sigma, dim=max(1, self.optimizer.num_elements),
                                            max_grad_norm=self.optimizer.max_grad_norm)
        if self.ledger is not None and (self.distributed is None or self.distributed.rank == 0):
            self.ledger.append(key=key, sampler_step=self.optimizer.sampler_step, sigma=sigma,
                               q=self.sample_rate, run=self.run_id)
        self._account(sigma)

    def _account(self, sigma: float) -> None:
        if self.sample_rate is None:
            # No data_loader and no sample_rate: this release cannot be charged (the accountant needs q).
            # engine.get_epsilon and state_dict refuse from now on; the accountant itself is marked lost,
            # so that its Opacus-style get_epsilon / get_privacy_spent / report, which know nothing of the
            # engine, report infinity rather than the epsilon of a history that misses this release (0.0
            # for one that misses every release). Setting sample_rate later cannot undo it: this release
            # stays uncharged. A run without a loader that passes sample_rate (the audits do) is charged.
            self.accountant.lost = ("a step was released with an unknown sampling rate (no data_loader and no "
                                    "sample_rate given to make_private), so it was never charged")
            return
        if sigma == 0:
            self._lose_privacy("a step was released without noise (noise_multiplier=0)")
            return
        self.accountant.step(noise_multiplier=sigma, sample_rate=self.sample_rate, steps=1)

    def _lose_privacy(self, why: str) -> None:
        self.accountant.lost = why  # engine.accountant.get_epsilon (Opacus' call) reports infinity too
        if not self._no_privacy:
            self.why_no_privacy = why
            if self.ledger is not None and (self.distributed is None or self.distributed.rank == 0):
                self.ledger.append_event("guarantee_lost", why=why, run=self.run_id)
        self._no_privacy = True

    def _refused(self, exc: BaseException, why: str | None = None) -> None:
        """The optimizer refused a drawn logical batch (or the loop abandoned one): the guarantee is
        lost. ``why``: a specific one-line reason, warned and kept in ``why_no_privacy``."""
        first = not self._no_privacy
        self._lose_privacy(why or f"a logical batch was refused ({type(exc).__name__}): whether the parameters "
                                  "moved depends on the data without noise")
        if first:
            warnings.warn(f"{why}: get_epsilon() now reports infinity" if why else
                          f"a sampled logical batch was refused ({type(exc).__name__}); nothing was released, but "
                          "the refusal itself depends on the data without noise, so get_epsilon() now reports "
                          "infinity. Fix the cause and start a new run", stacklevel=3)

    def _before_step(self) -> None:
        """Run by the optimizer at the start of every step(), before anything is accumulated or released."""
        if self._forked_running:
            raise DPError("this process was forked from one whose engine had already run make_private: the child "
                          "holds the parent's noise and Poisson keys, so both would release the same noise. Build "
                          "the engine in the child, or fork before make_private (a copy made then draws its own keys)")
        if self._ledger_check_due:
            self._refuse_used_ledger()

    def _refuse_used_ledger(self) -> None:
        entries = self.ledger.records()
        if not entries:
            return
        mine = [e for e in entries if e.get("run") == self.run_id]
        raise DPError(
            f"privacy ledger {self.ledger.path} already records {len(entries)} releases "
            + ("of this run: load its checkpoint (engine.load_state_dict) before the first step() to resume"
               if mine else "of another run: give each run its own ledger file"))

    def compose_after(self, earlier) -> None:
        """Charges this engine, before its first release, with everything an earlier engine released
        on the same private data (a PrivacyEngine or its ``state_dict()``): a DP-SAD teacher trained
        before its student, one model of a pipeline before the next. ``get_epsilon()`` is then the
        epsilon of the whole pipeline, and ``make_private_with_epsilon`` calibrates this engine's noise
        for what the earlier one left of the budget.

        Why this is sound: the phases of the two histories are each a Poisson-subsampled Gaussian
        mechanism with its own fresh noise and its own independent batches, run one after the other,
        each chosen knowing only what the earlier ones released; that is adaptive composition, which is
        what the accountant computes over a history. It would not hold if the two engines shared a seed:
        their noise keys (seed, step) and batches would repeat, and the difference of two releases would
        cancel the noise. That is refused, as is an earlier engine that already lost its guarantee (this
        one loses it too) and a call after this engine released anything."""
        from .ledger import legacy_run_id, run_id_of

        if isinstance(earlier, PrivacyEngine):
            earlier = earlier.state_dict()
        if not isinstance(earlier, dict) or earlier.get("version") != 1 or "accountant" not in earlier:
            raise ValueError("compose_after takes a PrivacyEngine or its state_dict()")
        if self.accountant.steps or self.steps:
            raise DPError("compose_after must come before this engine's first release (its history would be "
                          "composed in the wrong order)")
        # each earlier engine: its run id (public) and its seed (secret: kept only in this engine's state_dict,
        # a checkpoint as secret as the seed it already holds), to refuse a shared seed below. An entry from a
        # checkpoint written before run ids were random has no seed; its run id is then the seed's old hash.
        runs = [dict(p) for p in earlier.get("prior", [])] + [
            {"run": run_id_of(earlier), "steps": sum(int(n) for *_, n in earlier["accountant"]["history"])
             - sum(int(p["steps"]) for p in earlier.get("prior", [])), "secure_mode": bool(earlier.get("secure_mode")),
             "seed": int(earlier["seed"])}]

        def same_seed(r):
            return int(r["seed"]) == self.seed if "seed" in r else r["run"] == legacy_run_id(self.seed)

        if not self.secure_mode and any(same_seed(r) and not r.get("secure_mode") for r in runs):
            raise DPError("this engine has the same seed as an earlier engine it composes after: their noise keys "
                          "and Poisson batches would repeat, and subtracting two releases would cancel the noise. "
                          "Give each engine its own seed (the default draws one from the OS)")
        # histories are plain (sigma, q, steps) phases: this engine's accountant composes them whatever
        # kind of accountant the earlier engine used
        state = self.accountant.state_dict()
        self.accountant.load_state_dict(dict(state, history=[list(p) for p in earlier["accountant"]["history"]]))
        self._prior = self._prior + [r for r in runs if r["run"] not in {p["run"] for p in self._prior}]
        if earlier.get("no_privacy"):
            self._lose_privacy(f"an earlier engine it composes after had lost its guarantee: "
                               f"{earlier.get('why_no_privacy')}")

    @property
    def prior_steps(self) -> int:
        """Releases charged to this engine by compose_after (not its own)."""
        return sum(int(p["steps"]) for p in self._prior)

    @property
    def prior_runs(self) -> list[dict]:
        """The earlier engines composed into this one: [{"run": public id, "steps": releases}] (their seeds,
        which state_dict keeps, left out)."""
        return [{k: v for k, v in p.items() if k != "seed"} for p in self._prior]

    @property
    def profile(self) -> dict:
        """How the last step computed each layer's norm and clipped sum (:mod:`dpfast.plan`): per
        single-site layer its strategy, the measured seconds per sample of each candidate (where it was
        calibrated in this process or read from the cache), the materialized bytes, and ``share``: the
        chosen strategy's measured time over the wall time between the last two releases (None before
        two releases). Layers that share parameters (tied weights, a module called twice, attention's
        packed projections) are not listed: their per-sample gradients are summed together, chunk by chunk."""
        if self.private_module is None:
            return {"layers": [], "step_s": None}
        period = self.optimizer.step_period_s if self.optimizer is not None else None
        rows = []
        for d in self.private_module.tape.last_plan:
            t = (d["times"] or {}).get(d["strategy"])
            spent = t * d["samples"] if t is not None else None
            rows.append({**d, "seconds": spent,
                         "share": spent / period if spent is not None and period else None})
        counts: dict[str, int] = {}
        for d in rows:
            counts[d["strategy"]] = counts.get(d["strategy"], 0) + 1
        return {"layers": rows, "strategies": counts, "step_s": period}

    @property
    def steps(self) -> int:
        return self.optimizer.steps if self.optimizer is not None else 0

    @property
    def key_seed(self) -> int:
        """The Philox key of the noise and the Poisson batches: the seed until the first resume, then a
        fresh 64-bit key drawn by every :meth:`load_state_dict` (:meth:`_resume_key`; the class docstring says
        why). Secret, as the seed is; secure mode keys both from its own ChaCha20 key instead."""
        return self.seed if self._key is None else self._key

    @property
    def record_seed(self) -> int:
        """The key of the per-record training randomness (:meth:`record_generators`): the noise seed,
        or in secure mode 64 bits derived from the secure key, which no checkpoint holds (a seed the
        user pinned or a checkpoint gave away must not be what keeps these draws secret)."""
        if self._secure_key is None:
            return self.seed
        import hashlib

        return int.from_bytes(hashlib.sha256(b"dpfast-record-randomness:" + self._secure_key).digest()[:8], "little")

    def record_generators(self, device=None) -> list[torch.Generator]:
        """One ``torch.Generator`` per sample of the chunk the private loader yielded last, for the
        randomness of its rows in the loss (diffusion noise, timesteps, augmentations): sample ``i``'s
        is keyed by (:attr:`record_seed`, the logical step, its index in the data set) alone
        (:func:`dpfast.random.record_generators`, which gives the argument and why the key stays secret).
        Draw each sample's K rows from its own generator, in the chunk's order, e.g.
        ``torch.cat([torch.randn(K, *x.shape[1:], generator=g) for g in engine.record_generators()])``."""
        from .random import record_generators

        if self.loader is None or self.loader.chunk_step is None:
            raise DPError("record_generators() needs a chunk from the private data loader that make_private "
                          "returned: call it inside the loop, after the loader yielded the batch")
        return record_generators(self.loader.chunk_indices, seed=self.record_seed, step=self.loader.chunk_step,
                                 device=device)

    def get_epsilon(self, delta: float) -> float:
        """Upper bound on epsilon spent so far (add/remove-one adjacency)."""
        if self.optimizer is not None and self.optimizer.steps and self.sample_rate is None:
            raise DPError("the sampling rate is unknown (no data_loader and no sample_rate given to "
                          "make_private), so the privacy spent cannot be accounted")
        if self._no_privacy:
            return math.inf   # why: self.why_no_privacy
        self._warn_if_a_drawn_batch_is_open()
        return self.accountant.get_epsilon(delta)

    def _warn_if_a_drawn_batch_is_open(self) -> None:
        """A logical batch drawn to its last chunk and never released: the loop left it (``break``).
        If that decision read the batch, the number of releases depends on the data without noise;
        dpfast cannot tell it from a stop at a step count, so it says so rather than report infinity
        (a loop that goes on past the batch loses the guarantee: DPOptimizer._announce_chunk)."""
        open_step = self.optimizer._open_step if self.optimizer is not None else None
        if open_step is not None and self.loader is not None and self.loader.step > open_step:
            warnings.warn(f"the logical batch of loader step {open_step} was drawn and never released: if the "
                          "loop left it on a check of the data, this epsilon does not cover that decision (leave "
                          "a loop only right after a step() that returned True)", stacklevel=3)

    # ------------------------------------------------------------------ Opacus' module checks and checkpoints
    @staticmethod
    def get_compatible_module(module: nn.Module) -> nn.Module:
        """Opacus' name for :func:`dpfast.fix_module` (BatchNorm -> GroupNorm, in place; returns the module)."""
        from .fix import fix_module

        return fix_module(module)

    @staticmethod
    def validate(*, module: nn.Module, optimizer=None, data_loader=None) -> None:
        """Raises UnsupportedModuleError (naming the layer and the fix) if dpfast cannot make ``module``
        private; Opacus' ``validate``. Nothing is changed."""
        from .private_module import check_module

        check_module(module)

    @classmethod
    def is_compatible(cls, *, module: nn.Module, optimizer=None, data_loader=None) -> bool:
        """Opacus' ``is_compatible``: whether :meth:`validate` passes."""
        from .errors import UnsupportedModuleError

        try:
            cls.validate(module=module, optimizer=optimizer, data_loader=data_loader)
        except UnsupportedModuleError:
            return False
        return True

    def save_checkpoint(self, *, path, module: nn.Module | None, optimizer=None, checkpoint_dict: dict | None = None,
                        noise_scheduler=None, grad_clip_scheduler=None, module_state_dict_kwargs=None,
                        torch_save_kwargs=None) -> None:
        """Opacus' ``save_checkpoint``: the module's and optimizer's state and this engine's (accountant,
        sampler position, noise seed) in one file, written atomically and readable by its owner only
        (it holds the noise seed: keep it as secret as the data). ``module=None`` writes the engine's
        state alone (beside a trainer's own checkpoint: accelerate's ``save_state``)."""
        if noise_scheduler is not None or grad_clip_scheduler is not None:
            raise DPError("noise and clip schedulers: set optimizer.noise_multiplier between steps and save your "
                          "scheduler's own state; dpfast checkpoints the noise multiplier of every release")
        from .diffusion.trainer import atomic_write_bytes

        state = dict(checkpoint_dict or {})
        state["privacy_engine_state_dict"] = self.state_dict()
        if module is not None:
            state["module_state_dict"] = module.state_dict(**(module_state_dict_kwargs or {}))
        if optimizer is not None:
            state["optimizer_state_dict"] = optimizer.state_dict()
        atomic_write_bytes(path, lambda f: torch.save(state, f, **(torch_save_kwargs or {})), secret=True)

    def load_checkpoint(self, *, path, module: nn.Module | None, optimizer=None, noise_scheduler=None,
                        grad_clip_scheduler=None, module_load_dict_kwargs=None, torch_load_kwargs=None) -> dict:
        """Opacus' ``load_checkpoint``; returns the checkpoint dict. Call it before ``make_private`` (the
        engine then adopts the checkpoint's seed, sampler position and accountant) or on the engine that
        wrote it; an engine that already drew its own seed refuses it."""
        if noise_scheduler is not None or grad_clip_scheduler is not None:
            raise DPError("noise and clip schedulers are not part of a dpfast checkpoint (see save_checkpoint)")
        state = torch.load(path, weights_only=False, **(torch_load_kwargs or {}))
        if "privacy_engine_state_dict" not in state:
            raise DPError(f"{path} is not a dpfast engine checkpoint (no privacy_engine_state_dict)")
        self.load_state_dict(state["privacy_engine_state_dict"])  # first: refuses before anything changes
        if module is not None:
            module.load_state_dict(state["module_state_dict"], **(module_load_dict_kwargs or {}))
        if optimizer is not None and "optimizer_state_dict" in state:
            optimizer.load_state_dict(state["optimizer_state_dict"])
        return state

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        if self.steps and self.sample_rate is None and not self._no_privacy:
            raise DPError("cannot checkpoint the privacy state: steps were taken with an unknown sampling "
                          "rate (no data_loader and no sample_rate given to make_private), so the privacy "
                          "spent is unknown")
        pending = self._pending_state
        if pending is not None:  # a checkpoint loaded, make_private not yet run: its progress, under this key
            return {**pending, "key": self.key_seed, "run_id": self.run_id, "accountant": self.accountant.state_dict(),
                    "sampler": None if pending.get("sampler") is None else dict(pending["sampler"], seed=self.key_seed),
                    "no_privacy": self._no_privacy, "why_no_privacy": self.why_no_privacy,
                    "prior": [dict(p) for p in self._prior]}
        return {
            "version": 1,
            "seed": self.seed,
            "key": self.key_seed,             # the noise and Poisson key now (a resume draws a new one)
            "run_id": self.run_id,            # random (dpfast.ledger.new_run_id): names the run in its ledger
            "secure_mode": self.secure_mode,  # the secure key is never saved: a resume draws a new one
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "accountant": self.accountant.state_dict(),
            "sampler": self._sampler_state(),
            "no_privacy": self._no_privacy,
            "why_no_privacy": self.why_no_privacy,
            "prior": [dict(p) for p in self._prior],
        }

    def _sampler_state(self) -> dict | None:
        """The loader's position, at the step of a logical batch that was drawn and not yet released if
        there is one. The loader advances its step as it yields a batch's last chunk, so a loop that left
        that chunk before optimizer.step() (``break`` on a check of the batch) would checkpoint the step
        after it, and a resume would skip a drawn batch without a release: the gap the optimizer refuses in
        one process (``DPOptimizer._announce_chunk``). Saved at the open step, a resume draws that batch
        again and releases it once (it was never released, so its noise key and batch are fresh). This
        process, if it goes on, still moves past it and loses the guarantee there."""
        if self.loader is None:
            return None
        sd = self.loader.state_dict()
        open_step = self.optimizer._open_step if self.optimizer is not None else None
        if open_step is not None and open_step < int(sd["step"]):
            sd = dict(sd, step=open_step)
        return sd

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("version") != 1:
            raise ValueError(f"unknown PrivacyEngine state version {sd.get('version')!r}")
        if sd.get("secure_mode", False) and not self.secure_mode:
            raise ValueError("this checkpoint is of a secure_mode run: resume it with "
                             "PrivacyEngine(secure_mode=True) (a new key is drawn), never with the Philox generator "
                             "keyed by the seed the checkpoint holds")
        # every check before anything changes: a refused checkpoint (caught by a script that then starts
        # afresh) must not leave its seed behind, or the next releases would repeat its noise and batches
        from .accounting import Accountant
        from .ledger import run_id_of

        for name in ("seed", "key", "steps"):
            v = sd.get(name, 0 if name == "key" else None)  # no key: a checkpoint keyed by its seed alone
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < (1 << 64):
                raise ValueError(f"checkpoint {name} must be an int in [0, 2**64), got {v!r}")
        # the run id the checkpoint stores, compared with the ledger's lines; never recomputed from the seed,
        # except for a checkpoint written before run ids were random (no run_id): its ledger holds the seed's hash
        rid = run_id_of(sd)
        adopt = self.optimizer is not None and sd["seed"] != self.seed
        if adopt:
            self._refuse_unless_adoptable(sd)
        if self.optimizer is not None:
            self._refuse_if_unreleased()
            if self._calibrated and (int(sd["steps"]) > 0 or sd.get("prior")):
                raise ValueError("this engine's noise multiplier was calibrated by make_private_with_epsilon before "
                                 f"the checkpoint's {sd['steps']} releases (and earlier engines) were known, so the run "
                                 "would miss its target: load the checkpoint before make_private_with_epsilon")
        Accountant.create(self.accountant_kind).load_state_dict(sd["accountant"])
        self._refuse_if_behind(sd)
        self._refuse_if_prior_dropped(sd)
        if self.loader is not None and sd.get("sampler") is not None:
            self.loader.check_state(sd["sampler"], seed=_checkpoint_key(sd))
        later, lost_events = self._ledger_after(sd)  # read before anything changes (I/O can fail)
        key = self._resume_key(sd)
        self.seed = sd["seed"]
        self._key = key
        self.run_id = rid
        self._seed_given = True
        self._ledger_check_due = False
        notes = []  # warned once the whole state is in place (a warning turned into an error must not
        # leave an engine half loaded: its key, say, beside the optimizer's old one)
        if sd.get("run_id") is None:
            notes.append("this checkpoint predates random run ids: its ledger names the run by a hash of the noise "
                         "seed, from which the seed can be brute-forced (2^64 hashes); keep that ledger as secret as "
                         "the checkpoint, or start a new run")
        if adopt:  # the loader and the optimizer were built with the seed this engine drew and never used
            self.optimizer.run_id = self.run_id
        self.accountant.load_state_dict(sd["accountant"])
        self._prior = [dict(p) for p in sd.get("prior", [])]
        # a release without noise can never be undone by loading a private checkpoint
        if sd.get("no_privacy", False):
            self._lose_privacy(sd.get("why_no_privacy") or "the checkpoint's run had lost its guarantee")
        if self.ledger is None and int(sd["steps"]) > 0:
            notes.append("loading a checkpoint without a privacy ledger: if steps after it were released (a "
                         "rollback), they are not charged" + (" and their noise keys repeat (deterministic_resume)"
                                                              if self.deterministic_resume else "")
                         + ". Pass PrivacyEngine(ledger=...) to keep a durable record of every release")
        sd = self._charge_ledger_after(sd, later, lost_events, notes)
        if self.optimizer is None:
            self._pending_state = sd  # applied by make_private: steps and sampler position
        else:
            self._apply_progress(sd)
        for note in notes:
            warnings.warn(note, stacklevel=2)

    def _resume_key(self, sd: dict) -> int:
        """The noise and Poisson key of the continuation of checkpoint ``sd``: 64 fresh bits (from the OS,
        or under torch.distributed derived from rank 0's secret pad), or with ``deterministic_resume`` the
        checkpoint's own key.

        Why fresh. A checkpoint's state is a file, and files get copied: a run directory copied or
        restored from a backup, a volume snapshot, a rerun after a crash whose ledger was lost. Keyed by
        the checkpoint, every continuation would release step s with the same noise z_s; two of them
        whose clipped sums differ (other data, a nondeterministic kernel) release g + z_s and g' + z_s,
        whose difference g - g' carries no noise at all. The ledger's copy check (dpfast.ledger) sees
        copies only through inodes, which a restore or a snapshot can preserve. With a fresh key, the
        noise and the Poisson coins of each continuation are independent of every other continuation's
        and of the checkpoint, whatever was copied: each release is an ordinary Gaussian mechanism on
        a fresh Poisson batch, and two continuations compose as two runs from one starting point do
        (both are charged where they share a ledger; the rest is the user's composition to count, as
        for any two trainings on one data set). Nothing else is lost: the accountant does not depend
        on the key, and Poisson sampling at rate q with fresh coins is still Poisson sampling at q.

        What each continuation's epsilon covers: its own history, the checkpoint's releases and its own
        after them. Where two continuations are both used (released, or one trained on the other's
        output), their privacy is the composition of the shared prefix and both suffixes, which an
        engine's ``get_epsilon`` reports only where it resumes next to a ledger that records the other
        continuation's releases.
        Fresh keys make it an ordinary composition instead of a cancellation of the noise.

        Without torch.distributed (and before make_private under it) the key is 64 bits drawn from the
        OS at this load. Under torch.distributed, after make_private, the ranks must agree without a collective (a rank that does not load must be
        refused, not hang): the key is then SHA-256 of (the engine's pad, the checkpoint's key, the
        number of this load), the pad being 64 OS bits held in memory only and set to rank 0's by
        make_private. Ranks that load the same checkpoint as often agree; a rank that loaded another
        one, or none, has another key or step count, which the first release's fingerprint refuses on
        every rank before anything is released. A copy of the engine object made before make_private
        (pickle, deepcopy, fork) draws its own key and pad (``_rekey_copy``). (A load before
        make_private draws from the OS; make_private then gives every rank rank 0's key.)"""
        if self.deterministic_resume:
            return _checkpoint_key(sd)
        self._loads += 1
        if self.distributed is None:
            return int.from_bytes(os.urandom(8), "little")
        import hashlib

        material = b"dpfast-resume-key:" + b"".join(
            int(v).to_bytes(8, "little") for v in (self._resume_pad, _checkpoint_key(sd), self._loads))
        return int.from_bytes(hashlib.sha256(material).digest()[:8], "little")

    def __setstate__(self, state: dict) -> None:
        """A copy (pickle, copy.deepcopy) is another engine: it never shares the original's keys."""
        self.__dict__.update(state)
        _ENGINES.add(self)
        self._rekey_copy()

    def _rekey_copy(self) -> None:
        """This object is a copy of another engine (unpickled, deep-copied, or in a forked child): both
        may go on to release, so none of the original's secret keys may key this one's noise or batches.
        Before make_private that is sound to change: nothing was keyed yet. An OS-drawn seed, a resume
        key and a secure key are drawn afresh (a seed the user chose stays: its reuse is the user's, as
        for two engines built with it; so does deterministic_resume's key). After make_private the
        loader and optimizer hold the keys; a copy of those is refused where they are copied
        (DPOptimizer, DPDataLoader in secure mode) or, in a forked child, refused at its first step()
        (``_forked_running``, set by the fork hook)."""
        from .ledger import new_run_id

        self._resume_pad = int.from_bytes(os.urandom(8), "little")
        if self.optimizer is not None:
            return
        if not self._seed_given:
            self.seed = int.from_bytes(os.urandom(8), "little")
            self.run_id = new_run_id()
        if self._key is not None and not self.deterministic_resume:
            self._key = int.from_bytes(os.urandom(8), "little")
        if self._secure_key is not None:
            from .random_secure import new_key

            self._secure_key = new_key()

    def _refuse_unless_adoptable(self, sd: dict) -> None:
        """A checkpoint loaded after ``make_private`` (accelerate's ``load_state`` after ``prepare``, the
        diffusers order) has another seed than the one this engine drew from the OS. Adopting it is sound
        only while that drawn seed has keyed nothing: no release, no charge, no batch drawn (a Poisson
        batch planned with it would sit beside the checkpoint's sampler position), no earlier engine
        composed in. Then the engine is exactly one built from the checkpoint before make_private: every
        later release is the checkpoint run's next step, under a key drawn for this resume. Under
        torch.distributed each rank adopts what it loads; the first release checks that every rank holds
        the same seed, noise key and sampler step (:meth:`DistributedContext.all_reduce_`), so a rank
        that did not load stops the run before anything is released."""
        opt = self.optimizer
        why = None
        if self._seed_given:
            why = "this engine's seed was chosen (PrivacyEngine(seed=...) or an earlier checkpoint)"
        elif self._prior:
            why = "this engine composes after an earlier engine (compose_after)"
        elif opt.steps or opt._last_key >= 0 or self.accountant.steps or self._no_privacy:
            why = f"this engine already released {max(opt.steps, self.accountant.steps)} steps with its own seed"
        elif opt._acc or opt._chunk_pending or opt._refused is not None or \
                (self.loader is not None and self.loader._drawn):
            why = "this engine's loader already drew a batch with its own seed"
        elif self.ledger is not None:
            if any(e.get("run") == self.run_id for e in self.ledger.entries()):
                why = "the ledger records releases of this engine's own seed"
        if why is not None:
            raise ValueError(f"checkpoint was made with another seed and {why}: build the engine with "
                             "PrivacyEngine(seed=...) from the checkpoint, or load it before make_private or "
                             "the first batch")

    def _refuse_if_unreleased(self) -> None:
        """A batch drawn (and maybe backpropagated) before the load and not yet released would be
        released after it with the checkpoint's noise key but its own, possibly already released,
        Poisson batch."""
        opt = self.optimizer
        if opt._chunk_pending or opt._acc or opt._refused is not None:
            raise ValueError("a batch drawn before this load is waiting for optimizer.step(): load the checkpoint "
                             "before drawing the first batch (or right after a step())")

    def _refuse_if_prior_dropped(self, sd: dict) -> None:
        """Engines composed before this one (compose_after) released on the same data: a checkpoint that
        does not carry them would make get_epsilon forget those releases."""
        theirs = {p.get("run") for p in sd.get("prior", [])}
        dropped = [p for p in self._prior if p.get("run") not in theirs]
        if dropped:
            raise ValueError(f"this engine composes after {len(dropped)} earlier engine(s) that the checkpoint does "
                             "not: loading it would forget their releases on the same data. Load a checkpoint of "
                             "the composed run")

    def _ledger_after(self, sd: dict) -> tuple[list, list]:
        """(releases the ledger records at or after checkpoint ``sd``'s step, guarantee-lost events) of
        its run; read only."""
        if self.ledger is None:
            return [], []
        from .ledger import run_id_of

        copied = None if self.adopt_copied_ledger else self.ledger.copied_from()
        if copied is not None and int(sd["steps"]) > 0:
            raise ValueError(f"the privacy ledger {self.ledger.path} is a copy (it was written as another file, inode "
                             f"{copied}): a copied run directory continued beside its original releases the same noise "
                             "keys and batches, and their difference cancels the noise. Start a new run; if the "
                             "original will never continue (the run was moved), pass PrivacyEngine("
                             "adopt_copied_ledger=True) (dpfast train --adopt-copied-run)")
        mine = [e for e in self.ledger.entries() if e.get("run") == run_id_of(sd)]
        lost = [e for e in mine if e.get("event") == "guarantee_lost"]
        released = [e for e in mine if "event" not in e]
        for e in released:  # malformed: refused here, before anything changes
            sigma, q, taken = e.get("sigma"), e.get("q"), e.get("sampler_step")
            ok = isinstance(e.get("key"), int) and (sigma is None or isinstance(sigma, (int, float))
                                                     and math.isfinite(sigma) and sigma >= 0) \
                and (q is None or isinstance(q, (int, float)) and 0 < q <= 1) \
                and (q is None or sigma is not None) and (taken is None or isinstance(taken, int))
            if not ok or any(isinstance(v, bool) for v in (e.get("key"), sigma, q, taken)):
                raise ValueError(f"the privacy ledger {self.ledger.path} has a malformed release: {e!r}; it "
                                 "cannot be charged, so the run cannot resume next to it")
        later = [e for e in released if e["key"] >= int(sd["steps"])]
        # The ledger must be this run's record. A checkpoint copied to a new directory (a branch of the run,
        # a move to another machine), or next to a ledger restored from an older backup, finds a ledger that
        # lacks releases the checkpoint says were made; it cannot know what else the run released after the
        # checkpoint either, so its next noise keys and Poisson batches may be ones already released (with
        # data that moved, the difference of two releases of one key cancels the noise).
        keys = {e["key"] for e in released}
        missing = [k for k in range(int(sd["steps"])) if k not in keys]
        if missing:
            raise ValueError(f"the privacy ledger {self.ledger.path} is not this checkpoint's run's: the checkpoint "
                             f"says run {run_id_of(sd)} released {sd['steps']} steps, and the ledger has no record of "
                             f"{len(missing)} of them (first: step {missing[0]}). Resume next to the run's own ledger "
                             "(a copied or restored checkpoint may repeat releases it cannot see), or start a new run")
        return later, lost

    def _charge_ledger_after(self, sd: dict, later: list, lost: list, notes: list) -> dict:
        """Releases the ledger records after checkpoint ``sd`` were made and may not be forgotten: charge
        them, and move the noise key and the sampler past them (fresh noise, fresh batches)."""
        if self.ledger is None:
            return sd
        if lost:
            self._lose_privacy(f"the privacy ledger records that the guarantee was lost: {lost[0].get('why')}")
        if not later:
            return sd
        for e in later:
            if e.get("q") is not None and self.sample_rate is None:
                self.sample_rate = float(e["q"])
            if e.get("q") is None:
                self._lose_privacy("the ledger records a release with an unknown sampling rate")
            elif float(e["sigma"]) == 0:
                self._lose_privacy("the ledger records a release without noise")
            else:
                self.accountant.step(noise_multiplier=float(e["sigma"]), sample_rate=float(e["q"]), steps=1)
        notes.append(f"{len(later)} steps released after this checkpoint (privacy ledger {self.ledger.path}) "
                     "stay charged; the run continues with fresh noise keys and batches after them")
        sd = dict(sd, steps=max(int(e["key"]) for e in later) + 1)
        steps_taken = [int(e["sampler_step"]) for e in later if e.get("sampler_step") is not None]
        if sd.get("sampler") is not None and steps_taken:
            sd["sampler"] = dict(sd["sampler"], step=max(int(sd["sampler"]["step"]), max(steps_taken) + 1))
        return sd

    def _refuse_if_behind(self, sd: dict) -> None:
        """A checkpoint behind what this engine already released would forget spent privacy and make
        (with deterministic_resume) the next releases reuse noise keys and batches: refuse it."""
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
        self.optimizer._last_key = max(self.optimizer._last_key, int(sd["steps"]) - 1)
        self.optimizer.seed = self.key_seed
        self.optimizer.run_id = self.run_id
        if self.loader is not None:
            self.loader.seed = self.key_seed
        if self.loader is not None and sd["sampler"] is not None:
            # the checkpoint's position, drawn with this engine's key (checked against the checkpoint's)
            self.loader.load_state_dict(dict(sd["sampler"], seed=self.key_seed))
            # the checkpointed run released every batch before the sampler's position
            self.optimizer._last_sampler_step = max(self.optimizer._last_sampler_step, int(sd["sampler"]["step"]) - 1)


def _checkpoint_key(sd: dict) -> int:
    """The key checkpoint ``sd``'s run drew its noise and batches with (its seed before keys were saved)."""
    return int(sd.get("key", sd["seed"]))


_GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "expanded_weights", "ghost")


class RowReducedLoss(nn.Module):
    """A torch loss reduced as the engine undoes it: per-row losses (``reduction="none"``), each row's
    mean over its elements, then a plain mean (or sum) over the rows. A loss's own "mean" can divide by
    a data-dependent count (``CrossEntropyLoss(weight=...)`` divides by the sum of the batch's class
    weights, ``ignore_index`` by the rows not ignored): removing one record would then rescale every
    other sample's contribution, past the clip bound. Ghost mode returns the criterion wrapped in this."""

    def __init__(self, loss: nn.Module, reduction: str = "mean"):
        super().__init__()
        if not hasattr(loss, "reduction"):
            raise DPError(f"criterion {type(loss).__name__} has no reduction attribute: pass a torch loss module, or "
                          "compute per-row losses and their plain mean yourself")
        import copy

        self.loss = copy.copy(loss)
        self.loss.reduction = "none"
        self.reduction = reduction

    def forward(self, *args, **kwargs):
        rows = self.loss(*args, **kwargs)
        rows = rows.reshape(rows.shape[0], -1) if rows.dim() > 0 else rows.reshape(1, 1)
        return rows.mean(1).mean() if self.reduction == "mean" else rows.sum()


def _opacus_keywords(engine, *, max_grad_norm, criterion, loss_reduction, grad_sample_mode, clipping, batch_first,
                     wrap_model, noise_generator, rand_on_empty, secure_mode) -> bool:
    """Checks Opacus' make_private keywords; returns True for Opacus' ghost-clipping tuple."""
    if isinstance(max_grad_norm, (list, tuple)):
        raise DPError("a list of max_grad_norm values is Opacus' per-layer clipping; dpfast clips each sample's "
                      "whole gradient to one norm (pass one number)")
    if clipping != "flat":
        raise DPError(f"clipping={clipping!r}: dpfast clips flat (one norm over all layers, exact per-sample); "
                      "per-layer and adaptive clipping are not supported")
    if grad_sample_mode is not None and grad_sample_mode not in _GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {_GRAD_SAMPLE_MODES} (or left out), got {grad_sample_mode!r}")
    if not batch_first:
        raise DPError("batch_first=False: dpfast needs the batch first in the model's inputs (rows are dim 0); "
                      "transpose the inputs, or keep batch_first=True (nn.MultiheadAttention's own batch_first is "
                      "handled per layer)")
    if not isinstance(wrap_model, bool):
        raise ValueError(f"wrap_model must be True or False, got {wrap_model!r}")  # dpfast never wraps the module
    if noise_generator is not None:
        raise DPError("noise_generator: dpfast's noise is counter-based, keyed by the engine's seed: use "
                      "PrivacyEngine(seed=...) for reproducible noise (keep the seed secret) or "
                      "PrivacyEngine(secure_mode=True) for cryptographic noise")
    if rand_on_empty:
        raise DPError("rand_on_empty=True: dpfast yields an empty chunk for an empty Poisson batch and the step still "
                      "releases its noise; skip the forward and backward when len(x) == 0 and call optimizer.step()")
    if secure_mode is not None and bool(secure_mode) != engine.secure_mode:
        raise DPError(f"secure_mode={secure_mode!r} is a property of the engine: pass PrivacyEngine(secure_mode="
                      f"{bool(secure_mode)!r})")
    ghost = grad_sample_mode == "ghost"
    reduction = getattr(criterion, "reduction", None)
    if criterion is not None and reduction is not None and reduction != loss_reduction:
        raise DPError(f"criterion.reduction is {reduction!r} but loss_reduction is {loss_reduction!r}: make them agree "
                      "(the engine undoes the reduction to find each sample's gradient)")
    return ghost


def _check_number(name, value, lo, lo_open):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < lo or (lo_open and value == lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
