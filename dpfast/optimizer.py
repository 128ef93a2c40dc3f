"""DPOptimizer: wraps any torch optimizer; its step() clips, sums, noises and then steps the inner one.

Per physical batch (chunk): per-sample norms from the tape -> clip factors -> clipped sum added to an
fp32 accumulator. At the end of the logical batch: (all-reduce across ranks), one fused finalize adds
``sigma * C * xi`` (Philox keyed on seed, step and element index) and scales by ``1 / B_expected``,
then the inner optimizer steps. Noise is added exactly once per logical batch.

The loader/optimizer handshake, in one place: the private DPDataLoader calls ``_announce_chunk``
before it yields each physical chunk (how many samples came, whether the chunk ends its logical
batch). The optimizer owns the one thing that keys the noise: ``steps``, the count of releases,
which only ever grows (a release whose key is not above the last one is refused). Every release is
charged to the accountant (and written to the engine's ledger, if any) *before* the noisy gradient
reaches a parameter. A refused logical batch releases nothing, but whether parameters moved then
depends on the data without noise: the engine reports an infinite epsilon from then on. So does a
drawn logical batch that the loop leaves unreleased while the loader moves on (``_announce_chunk``);
one left part-way is drawn again by the next iterator. ``max_grad_norm`` is fixed for a logical batch
by its first chunk.
"""
from __future__ import annotations

import math
import numbers
import time
import warnings

import torch

from .errors import BatchLayoutError, DPError, NonFiniteGradientError, PrivacyLeakError, RankStateMismatchError
from .finalize import finalize_
from .random import normal_f64


class DPOptimizer(torch.optim.Optimizer):
    # Deliberately no super().__init__: param_groups/state/defaults are the inner optimizer's own
    # objects, so LR schedulers and checkpoint code see exactly what they would see without dpfast.

    def __init__(self, optimizer: torch.optim.Optimizer, private_module, *, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: float | None, loss_reduction: str, seed: int,
                 on_release=None, on_refusal=None, nonfinite: str = "zero", distributed=None, param_names=None,
                 secure_key: bytes | None = None, run_id: str | None = None):
        from .ledger import new_run_id

        self.original_optimizer = optimizer
        self.private_module = private_module
        self._noise_multiplier = _checked_sigma(noise_multiplier)
        # the clipping norm of the logical batch in progress: fixed by its first chunk's step(), used for
        # every later chunk's clipping and for the noise (sigma * C), None between logical batches
        self._clip_in_force: float | None = None
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.loss_reduction = loss_reduction
        self.seed = int(seed)
        # the run's public name in state_dict's stamp: the engine's (random, dpfast.ledger), never the seed's hash
        self.run_id = run_id if run_id is not None else new_run_id()
        self.nonfinite = nonfinite
        self.distributed = distributed
        self._secure_key = secure_key    # secure mode: ChaCha20 + exact discrete Gaussian noise
        self._on_release = on_release    # engine: charge the accountant (and ledger) before a release
        self._on_refusal = on_refusal    # engine: a refused logical batch makes epsilon infinite
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        # every parameter the inner optimizer held at make_private; one added later (param_groups
        # appended to, a list extended) would be updated with its raw gradient
        self._group_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self._param_ids = {id(p) for p in self.params}
        # every parameter the inner optimizer or the module holds, trainable or not: any gradient that
        # appears on one of them came from outside the per-sample rules and must stop the step
        self._watched = list({id(p): p for p in [*(p for g in optimizer.param_groups for p in g["params"]),
                                                 *private_module.module.parameters()]}.values())
        self._names = param_names or {}
        self._offsets = []
        off = 0
        for p in self.params:
            self._offsets.append(off)
            off += p.numel()
        self.num_elements = off
        self._acc: dict[int, torch.Tensor] = {}
        self._chunk: tuple[int, bool] | None = None  # announced by the DPDataLoader: (samples, is_last)
        self._chunk_pending = False
        self._chunk_source = None      # the loader iterator that announced the pending chunk
        self.steps = 0                 # logical steps released; also the noise key of the next release
        self._last_key = -1            # noise key of the last release: keys strictly increase
        self._last_sampler_step = -1   # the loader's step of the last release: batches are never reused
        self.sampler_step: int | None = None    # the loader's logical step of the current batch
        # the loader's step of a logical batch that was drawn (a chunk of it announced) and is neither
        # released nor refused yet; moving on to another step while it is set loses the guarantee
        self._open_step: int | None = None
        self.data_loader_attached = False       # set by make_private when it returns a DPDataLoader
        self._refused: BaseException | None = None  # an earlier chunk of this logical batch failed
        self.last_norms: torch.Tensor | None = None
        self.stats = {"samples": 0, "clipped": 0, "chunks": 0, "nonfinite": 0}
        # did the last step() take a logical step? The same as its return value, for loops whose
        # wrapper loses it (accelerate's AcceleratedOptimizer.step returns None): advance LR
        # schedulers, EMA and global_step only when it is True
        self.took_step = False
        self._before_step = None  # the engine's checks at the start of every step()
        self._released_at: float | None = None
        self.step_period_s: float | None = None  # engine.profile: the step its layer shares are of

    # ----------------------------------------------------------- torch.optim.Optimizer surface
    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        return self.original_optimizer.state

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    @property
    def max_grad_norm(self) -> float:
        """The clipping norm C. A clip schedule sets it between logical steps (after a ``step()`` that
        returned True), and each release is noised with the C it was clipped at.

        C is fixed for a whole logical batch by the ``step()`` of its first physical chunk: every chunk
        of that batch is clipped at it and the noise is ``sigma * C``. A value set while a logical batch
        is part-way (after the ``step()`` of a chunk that did not end it) makes the next ``step()`` raise
        DPError before that chunk is clipped and before anything is released; nothing changes then, and
        setting the batch's value back lets the same chunk be stepped again. Otherwise earlier chunks
        would be clipped at one C and the noise drawn for another: with a smaller C at the release, a
        record clipped at the larger one would be covered by too little noise."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value) -> None:
        v = _as_real("max_grad_norm", value)
        if not v > 0:
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {value!r}")
        self._max_grad_norm = v

    @property
    def noise_multiplier(self) -> float:
        return self._noise_multiplier

    @noise_multiplier.setter
    def noise_multiplier(self, value) -> None:
        # noise schedulers set this between steps: each release is charged with the value it used
        self._noise_multiplier = _checked_sigma(value)

    def state_dict(self):
        # stamped with the releases behind it: loaded into an engine that released fewer, it is refused at
        # the next step (the engine's state was not restored with it)
        return {**self.original_optimizer.state_dict(), "dpfast": {"steps": self.steps, "run": self.run_id}}

    def load_state_dict(self, state_dict):
        # the optimizer of a run that released steps: the engine's state must be restored too (in either
        # order: accelerate's load_state restores the optimizer before registered objects), checked at the
        # next step. A state without the stamp comes from a plain torch optimizer (public pre-training).
        state_dict = dict(state_dict)
        self._loaded_stamp = state_dict.pop("dpfast", None)
        self.original_optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group):
        raise DPError("add_param_group after make_private would change the noise layout; add all "
                      "parameter groups before calling make_private")

    def __repr__(self):
        return (f"DPOptimizer(noise_multiplier={self.noise_multiplier}, max_grad_norm={self.max_grad_norm}, "
                f"inner={self.original_optimizer!r})")

    # ----------------------------------------------------------- the loader's handshake
    def _announce_chunk(self, samples: int, is_last: bool, step: int | None = None,
                        is_first: bool = False, batch=None, source=None) -> None:
        """The loader's handshake: the next step() covers ``samples`` samples of the loader's logical
        step ``step`` (which keys Poisson membership, not the noise), and ``is_last`` ends that batch.
        Every trainable layer of the next forward must see ``samples * K`` rows; ``batch`` lets the
        module check the row layout of what it is given (repeat vs repeat_interleave)."""
        if self._chunk_pending and source is not None and source is self._chunk_source:
            # the same live iterator yields again before step(): a loop that accumulates gradients over
            # several loader batches, or one that fetches ahead. Dropping the earlier batch would lose its
            # samples silently, and summing two Poisson batches into one release is not the mechanism the
            # accountant charges (a record drawn in both would count twice).
            # The batch stays open (_open_step): nothing was drawn past it yet (this chunk is not yielded),
            # so a run that stops here skipped nothing; a loop that catches this and goes on to another
            # step loses the guarantee at that step's first chunk (below).
            self._discard_unreleased()
            raise DPError(
                "the private data loader was asked for its next batch before optimizer.step() was called for the "
                "previous one. Gradient accumulation over loader batches is not supported (each Poisson batch is "
                "one release): call optimizer.step() after every batch the loader yields, and for a larger "
                "logical batch raise the loader's batch_size (the expected logical batch) and set "
                "max_physical_batch_size for memory; dpfast then accumulates the physical chunks of each logical "
                "batch itself, and optimizer.step() returns True when a logical step was taken. A wrapper that "
                "fetches ahead (a prefetcher, accelerate's or Lightning's loader wrappers), a body that skips "
                "step() (continue), or next() on the same iterator trigger this too")
        abandoned = step is not None and self._open_step is not None and int(step) != self._open_step
        if is_first and (self._acc or self._refused is not None or self._chunk_pending):
            # a new logical batch starts (or the loop broke off and the loader re-drew the same one):
            # what was accumulated of an unfinished batch must not count again
            if not abandoned:  # the same batch drawn again (an abandoned one is reported below)
                warnings.warn("discarding an unfinished logical batch (the loop left the data loader before "
                              "its last chunk); nothing of it was released, and the loader draws it again",
                              stacklevel=3)
            self._discard_unreleased()
        if abandoned:
            # A drawn logical batch that was neither released nor refused, and the loader has moved on to
            # another step: the loop left it before optimizer.step() (`break`, or `continue` and the
            # DPError above caught, or any exception caught around the loop), and the loader advances its
            # step when it yields a batch's last chunk, so the batch will never be drawn again. Whether
            # that happened can depend on the data without noise (`if not isfinite(loss): continue`, a
            # check on the batch itself), and the gap it leaves is visible (in the released trajectory,
            # in the ledger's sampler steps): with the canary in the batch the step is skipped, without it
            # the step is released, a difference no noise covers (a delta of q, the chance it is drawn).
            # Charging the batch as a release would not cover it either: the accountant's Gaussian
            # mechanism bounds what the noisy sum reveals, not whether a release happened. So it is a
            # refusal, as a NaN batch refused by step() is: epsilon is infinite from now on.
            # What does not come here: a batch left part-way and drawn again (the loader did not advance,
            # so the next iterator re-yields the same step from its first chunk: step == _open_step), and
            # a loop that ends (nothing more is drawn; engine.state_dict() saves the sampler at the open
            # step, so a resume draws that batch again rather than skip it).
            lost, self._open_step = self._open_step, None
            self._refuse(DPError(f"the logical batch of loader step {lost} was drawn but never released"),
                         why=f"the logical batch of loader step {lost} was drawn but never released: the loop left "
                             f"it before optimizer.step() (break, continue, a caught exception) and the loader moved "
                             f"on to step {int(step)}, a skip that can depend on the data without noise (call step() "
                             "for every batch the loader yields; leave a loop only after a step() that returned True)")
        if self._chunk_pending:
            raise DPError("the data loader produced a new batch but optimizer.step() was not called for the "
                          "previous one: call optimizer.step() once for every batch the private loader yields")
        self._chunk = (samples, is_last)
        self._chunk_pending = True
        self._chunk_source = source
        self.private_module.expect_chunk(samples, batch)
        self.private_module.snapshot_state(force=True)
        if step is not None:
            self.sampler_step = int(step)
            self._open_step = int(step)  # drawn: released or refused at the step() of its last chunk

    def _discard_unreleased(self) -> None:
        """Drops what was computed of a batch that will never be released. Its forward may have written
        state (a running statistic) that the next chunk's snapshot would otherwise make invisible: that
        state would then be released with the model, so it loses the guarantee (epsilon infinite)."""
        written = self.private_module.written_state()
        if written:
            self._refuse(PrivacyLeakError(
                f"a batch that was never released wrote {written[:5]} (parameters or persistent buffers) during "
                "its forward/backward: that state is released with the model without noise"))
        self._acc.clear()
        self._refused = None
        self._clip_in_force = None
        self._chunk_pending = False
        self._chunk_source = None
        self.private_module.expect_chunk(None, None)
        self.private_module.tape.reset()

    # ----------------------------------------------------------- the step
    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._watched:
            p.grad = None
        tape = self.private_module.tape
        if any(s.received for s in tape.sites):
            warnings.warn("optimizer.zero_grad() discarded a backward pass that optimizer.step() never "
                          "consumed; that batch contributes nothing", stacklevel=2)
            tape.reset()
        # a forward still waiting for its backward is kept: Lightning's closure calls zero_grad between
        # them (the next forward of the model starts a new tape anyway)

    # torch.amp.GradScaler hands itself to step() (grad_scaler=, or the grad_scale / found_inf attributes
    # when step's signature is hidden, as accelerate's wrapper hides it) instead of unscaling the gradients
    # itself (which fails here with "No inf checks were recorded": dpfast's gradients exist only inside step)
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure=None, grad_scaler=None) -> bool:
        """Returns True when a logical step was taken (noise added, parameters updated), False after an
        intermediate physical chunk of a larger logical batch."""
        if self._before_step is not None:
            try:
                self._before_step()
            except Exception:
                self.took_step = False
                raise
        stamp = getattr(self, "_loaded_stamp", None)
        if stamp and int(stamp.get("steps", 0)) > 0:
            if int(stamp["steps"]) > self.steps or stamp.get("run") != self.run_id:
                # an optimizer state of a run that released more than this engine knows of: the engine's state
                # (accountant, sampler position, noise key) was not restored, and epsilon would restart below
                # what the model carries (accelerate's load_state without the engine)
                self.took_step = False
                raise DPError(f"optimizer state from a run that released {stamp['steps']} steps was loaded, but this "
                              f"engine {'is another run' if stamp.get('run') != self.run_id else f'has released {self.steps}'}: "
                              "restore the engine's state too (engine.load_state_dict or engine.load_checkpoint; with "
                              "accelerate, before make_private), so the privacy already spent is charged")
            self._loaded_stamp = None
        if grad_scaler is not None or getattr(self, "grad_scale", None) is not None \
                or getattr(self, "found_inf", None) is not None:
            self.took_step = False
            # fp16 loss scaling multiplies every per-sample gradient by the scale, and skips the steps that
            # overflow: a skip decided by the data, released without noise. Refused before anything is.
            raise DPError("torch.amp.GradScaler (fp16 loss scaling, also accelerate's mixed_precision='fp16') is "
                          "not supported: use bf16 autocast without a scaler (torch.autocast(device_type, "
                          "dtype=torch.bfloat16); accelerate: mixed_precision='bf16'); dpfast keeps norms, clipping "
                          "and the noisy sum in fp32")
        self.took_step = False
        if closure is not None:
            with torch.enable_grad():
                closure()
        if self.data_loader_attached and not self._chunk_pending:
            # each release must use a fresh Poisson batch and a fresh noise key (seed, sampler step);
            # a second step() on the same batch would reuse the key, and the noise would cancel
            raise DPError("optimizer.step() was called without a new batch from the private data loader: "
                          "call it exactly once per batch the loader yields")
        if self._clip_in_force is not None and self.max_grad_norm != self._clip_in_force:
            # C is fixed for the logical batch in progress by its first chunk (see max_grad_norm): its earlier
            # chunks were clipped at it, and the noise must be sigma times the C every chunk was clipped at.
            # Refused here, before this chunk is clipped and before anything is released, with the chunk
            # still pending: nothing changed, and setting C back lets this step() run again.
            raise DPError(f"max_grad_norm was changed from {self._clip_in_force} to {self.max_grad_norm} in the "
                          "middle of a logical batch (its earlier physical chunks were clipped at "
                          f"{self._clip_in_force}, and the noise must match the clipping of every chunk): set it "
                          "between logical steps, after a step() that returned True, or set it back to "
                          f"{self._clip_in_force} and call step() again")
        samples, is_last = self._chunk if self._chunk_pending else (None, True)
        self._chunk_pending = False
        self.private_module.expect_chunk(None, None)
        if self._clip_in_force is None:
            self._clip_in_force = self.max_grad_norm  # the first chunk of a logical batch fixes its C
        try:
            return self._step_chunk(samples, is_last)
        finally:
            if is_last:
                # the logical batch ends with this chunk: released, or refused (a refusal is charged by
                # _refuse; a RankStateMismatchError drops it whatever the data)
                self._clip_in_force = None
                self._open_step = None

    def _step_chunk(self, samples: int | None, is_last: bool) -> bool:
        try:
            if self._refused is not None:
                # an earlier chunk of this logical batch was refused: the whole batch is refused, the
                # same outcome whatever the physical split (and the same on every rank)
                self.private_module.tape.reset()
                if not is_last:
                    return False
                earlier, self._refused = self._refused, None
                raise DPError(f"the logical batch was refused because an earlier chunk failed: {earlier}")
            self._accumulate_chunk(samples)
        except Exception as exc:
            if not is_last:
                self._refused = exc
            self._acc.clear()       # the logical batch is refused as a whole
            self.private_module.tape.reset()
            if is_last and self.distributed is not None:
                # distributed: still take part in this step's one collective, flagging the refusal, so
                # the other ranks refuse it too rather than wait for us or fall out of step
                from .distributed import failure_code

                zeros = [self._acc_for(p) for p in self.params]
                self.distributed.all_reduce_(zeros, failed=failure_code(exc), step=self.steps,
                                             fingerprint=self._state_fingerprint())
                self._acc.clear()
            self._refuse(exc)  # at once: a loop that leaves after a refused early chunk is still charged
            raise
        if not is_last:
            return False
        try:
            self._finalize_logical_batch()
        except RankStateMismatchError:
            self.private_module.tape.reset()
            raise
        except Exception as exc:
            self._refuse(exc)
            raise
        self.original_optimizer.step()
        for p in self._watched:
            p.grad = None  # the released gradient has been used; keep p.grad free for the leak check
        self.took_step = True
        now = time.perf_counter()
        if self._released_at is not None:
            self.step_period_s = now - self._released_at  # wall time between the last two releases
        self._released_at = now
        return True

    def _state_fingerprint(self) -> bytes:
        from .distributed import state_fingerprint

        return state_fingerprint(self.seed, self.steps, self.sampler_step if self.data_loader_attached else None,
                                 (self.noise_multiplier, self.max_grad_norm, self.expected_batch_size,
                                  self.loss_reduction))

    @property
    def noise_step(self) -> int:
        """The noise key of the next release: the count of releases so far (never reused)."""
        return self.steps

    def _refuse(self, exc: BaseException, why: str | None = None) -> None:
        """A logical batch was drawn and refused (or abandoned before its release): nothing was
        released, but whether the parameters moved is now a noise-free function of the data (a NaN
        record sampled or not). ``why``: the engine's one-line reason, if not the generic one."""
        if self._on_refusal is not None:
            if why is None:
                self._on_refusal(exc)
            else:
                self._on_refusal(exc, why=why)

    def _name(self, p) -> str:
        return self._names.get(id(p), f"parameter of shape {tuple(p.shape)}")

    def _accumulate_chunk(self, samples: int | None) -> None:
        pm = self.private_module
        tape = pm.tape
        written = pm.written_state()
        if written:
            raise PrivacyLeakError(
                f"the forward/backward pass wrote {written[:5]} (parameters or persistent buffers): state computed "
                "from the private batch is released with the model without clipping or noise (a running "
                "statistic, a row reset to a record), so the step is refused. Compute such state from public "
                "data, keep it in a non-persistent buffer if it is a data-independent cache, or use "
                "dpfast.fix_module(model) for BatchNorm/InstanceNorm statistics")
        added = [self._name(p) for g in self.original_optimizer.param_groups for p in g["params"]
                 if id(p) not in self._group_ids]
        if added:
            raise PrivacyLeakError(
                f"the optimizer's param_groups hold parameters {added[:5]} added after make_private; the inner "
                "optimizer would update them with raw, unclipped gradients, so the step is refused. Put every "
                "parameter in the optimizer before make_private")
        late = [self._name(p) for p in self._watched if p.grad is not None and id(p) not in self._param_ids]
        if late:
            raise PrivacyLeakError(
                f"parameters {late[:5]} were not trainable when make_private ran and received gradients now "
                "(unfrozen later?); their gradients would skip clipping and noise, so the step is refused. "
                "Set requires_grad before make_private (freezing later is fine; unfreezing is not)")
        leaked = [self._name(p) for p in self.params if p.grad is not None]
        if leaked:
            raise PrivacyLeakError(
                f"parameters {leaked[:5]} received gradients outside dpfast's per-sample rules (used outside "
                "their module's forward, e.g. read directly by another module or by the loss); such gradients "
                "are not clipped per sample, so the step is refused")
        foreign = sorted({s.name for s in tape.sites if s.received
                          for t in s.targets if id(t.param) not in self._param_ids})
        if foreign:
            raise DPError(
                f"layers {foreign[:5]} produce gradients for parameters the optimizer did not hold at make_private "
                "(a weight replaced by a new nn.Parameter?); they would never be updated. Replace weights in "
                "place (with torch.no_grad(): layer.weight.copy_(...)) or rebuild the private model")
        if tape.sites and not any(s.received for s in tape.sites):
            raise DPError("optimizer.step() was called after a forward pass without backward: call "
                          "loss.backward() first")
        sq = tape.finish()
        rows = tape.rows or 0
        K = tape.multiplicity
        if samples is not None and rows and rows != samples * K:
            raise BatchLayoutError(
                f"the loss covers {rows} rows but the batch holds {samples} samples x multiplicity {K} = "
                f"{samples * K} rows: per-row losses must have shape (len(batch) * K,), rows i*K..i*K+K-1 "
                "being sample i")
        if samples and not tape.sites:
            raise DPError("optimizer.step() was called for a non-empty batch but no private layer ran "
                          "forward/backward: call the model returned by make_private and loss.backward()")
        self.stats["chunks"] += 1
        if rows == 0:
            tape.reset()
            return
        factor = (rows / K) if self.loss_reduction == "mean" else (1.0 / K)
        norms = sq.sqrt() * factor
        bad = ~torch.isfinite(norms)
        if bad.any():
            idx = bad.nonzero().flatten().tolist()
            if self.nonfinite == "raise":
                raise NonFiniteGradientError(
                    f"samples {idx[:10]} of this batch have non-finite gradient norms (NaN/inf loss or "
                    "overflow); the step was refused and no parameter changed, which depends on the data "
                    "without noise: epsilon is now infinite. The default nonfinite='zero' drops such samples' "
                    "contributions and still releases the noisy step (privacy-safe: per sample)")
            if pm.mode == "two-pass":
                raise NonFiniteGradientError(
                    f"samples {idx[:10]} have non-finite gradient norms; mode='two-pass' replays the forward "
                    "pass and cannot drop them: the step was refused, so epsilon is now infinite (use "
                    "mode='bk', which drops them and still releases the noisy step)")
            # Dropped without a word: a warning naming them (or only saying that some were dropped) on
            # stderr would release, without noise, whether and where a bad record was in the batch every
            # step it is drawn. The count is kept for the operator (stats["nonfinite"]), outside the guarantee.
            self.stats["nonfinite"] += len(idx)
            tape.drop_rows(bad.repeat_interleave(K))
        clip = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        clip = torch.where(bad, torch.zeros_like(clip), clip)
        self.last_norms = norms.detach()
        self.stats["samples"] += norms.numel()
        # kept on the device: reading it here would add a GPU sync to every chunk
        self.stats["clipped"] = self.stats["clipped"] + (norms > self.max_grad_norm).sum()
        row_scale = (clip * factor).repeat_interleave(K)
        if pm.mode == "two-pass":
            pm.replay(row_scale, self._add, bound=self.max_grad_norm)  # each sample's clipped norm <= C
            leaked = [self._name(p) for p in self._watched if p.grad is not None]
            if leaked:
                raise PrivacyLeakError(f"parameters {leaked[:5]} received gradients outside the per-sample "
                                       "rules during the two-pass replay; the step is refused")
        else:
            tape.clipped_sums(row_scale, self._add)
        tape.reset()

    def _acc_for(self, p: torch.Tensor) -> torch.Tensor:
        acc = self._acc.get(id(p))
        if acc is None:
            acc = self._acc[id(p)] = torch.zeros(p.shape, dtype=torch.float32 if p.dtype != torch.float64
                                                 else torch.float64, device=p.device)
        return acc

    def _add(self, target, g: torch.Tensor) -> None:
        acc = self._acc_for(target.param)
        if target.rows is None:
            acc.add_(g)
        else:
            acc[target.rows].add_(g)

    def _finalize_logical_batch(self) -> None:
        accs = [self._acc_for(p) for p in self.params]
        if self.distributed is not None:
            failed = self.distributed.all_reduce_(accs, step=self.steps, fingerprint=self._state_fingerprint())
            if self.distributed.disagree:
                # not a refusal of the batch: the states differ whatever the data, and nothing is released
                self._acc.clear()
                raise RankStateMismatchError(
                    f"rank {self.distributed.rank}: the ranks hold different seeds, noise keys or sampler steps at "
                    f"logical step {self.steps}; a checkpoint was probably loaded on some ranks only (load the "
                    "engine's state on every rank, before the first step); nothing was released")
            if failed:  # another rank refused its share of this logical batch: refuse it here too
                from .distributed import refused_step_error

                self._acc.clear()
                raise refused_step_error(failed, self.steps)
        if self.loss_reduction == "mean":
            if not self.expected_batch_size:
                raise DPError("expected batch size unknown: pass a data_loader or expected_batch_size to "
                              "make_private")
            scale = 1.0 / self.expected_batch_size
        else:
            scale = 1.0
        key = self.steps
        if key <= self._last_key:
            self._acc.clear()
            raise DPError(f"noise key {key} was already used by an earlier release (last key {self._last_key}): "
                          "the step counter was moved back (a stale checkpoint?); the step is refused")
        if self.data_loader_attached and self.sampler_step is not None:
            if self.sampler_step <= self._last_sampler_step:
                self._acc.clear()
                raise DPError(f"the loader's step {self.sampler_step} was already released (last: "
                              f"{self._last_sampler_step}): the sampler was rewound, and the same Poisson batch "
                              "would be released twice; the step is refused")
        if self._secure_key is not None and any(a.dtype != torch.float32 for a in accs):
            self._acc.clear()
            raise DPError("secure_mode releases fp32 gradients only, but some parameters are float64 now "
                          "(model.double() after make_private?); the step is refused")
        sigma = self.noise_multiplier
        # the C every chunk of this batch was clipped at (step() refuses a chunk after C was changed)
        clip = self._clip_in_force if self._clip_in_force is not None else self.max_grad_norm
        if self._on_release is not None:
            self._on_release(key, sigma)   # charged (and logged) before anything is released
        self._last_key = key
        if self.data_loader_attached and self.sampler_step is not None:
            self._last_sampler_step = self.sampler_step
        std = sigma * clip
        f32 = [i for i, a in enumerate(accs) if a.dtype == torch.float32]
        if f32:
            noise = dict(generator="chacha20", key=self._secure_key) if self._secure_key is not None else {}
            finalize_([accs[i] for i in f32], [accs[i] for i in f32], noise_std=std, scale=scale,
                      seed=self.seed, step=key, offsets=[self._offsets[i] for i in f32], **noise)
        for i, a in enumerate(accs):
            if a.dtype == torch.float64:  # fp64 models (exactness tests): the same stream, in fp64
                if std:
                    z = normal_f64(a.numel(), seed=self.seed, step=key, offset=self._offsets[i])
                    a.add_(torch.from_numpy(z).view_as(a).to(a.device), alpha=std)
                a.mul_(scale)
        for p, a in zip(self.params, accs):
            # a parameter frozen since make_private keeps its noise slot but is not updated
            p.grad = (a if a.dtype == p.dtype else a.to(p.dtype)) if p.requires_grad else None
        self._acc.clear()
        self.steps += 1

    def clip_fraction(self) -> float:
        """Fraction of samples clipped since the last reset of ``stats``."""
        return int(self.stats["clipped"]) / max(1, self.stats["samples"])


def _as_real(name: str, value) -> float:
    """A finite real number (int, float, numpy scalar, 0-d tensor) as a float, or a ValueError."""
    if torch.is_tensor(value) and value.dim() == 0 and value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _checked_sigma(value) -> float:
    v = _as_real("noise_multiplier", value)
    if v < 0:
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {value!r}")
    return v
