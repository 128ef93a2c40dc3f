"""Poisson-sampled data loading: each logical step draws every sample independently with probability q.

Membership of sample j at step s is ``u(key, s, j) < q`` with a counter-based generator (Philox, see
dpfast.random; ``key`` is the engine's ``key_seed``, drawn afresh at every resume), so the batch of a
step does not depend on the order of draws or on how many ranks share the data set: rank r keeps the members j with ``j % world_size == r`` and the union
over ranks is exactly the batch one process would draw.

A logical batch larger than ``max_physical_batch_size`` is yielded as several physical chunks; the
loader tells the optimizer which chunk ends the logical batch, so the user's loop stays
``for batch in loader: ...; optimizer.step()``.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from .errors import DPError
from .random import poisson_mask


def expand_rows(batch, multiplicity: int):
    """The rows of a batch for ``multiplicity=K``: each sample's K copies next to each other.

    Rows ``i*K .. i*K+K-1`` are sample i (``repeat_interleave``), the layout the engine clips as one
    sample. ``x.repeat(K, ...)`` would put sample i at rows ``k*n + i`` instead, and one record would
    steer K rows clipped as parts of K different samples (influence K x max_grad_norm). ``batch``: a
    tensor or a (nested) tuple/list/dict of tensors with the samples in dim 0; other leaves (captions)
    are repeated per sample as lists."""
    if isinstance(multiplicity, bool) or not isinstance(multiplicity, int) or multiplicity < 1:
        raise ValueError(f"multiplicity must be an int >= 1, got {multiplicity!r}")
    K = multiplicity
    if torch.is_tensor(batch):
        if batch.dim() == 0:
            raise ValueError("expand_rows needs the samples in dim 0, got a 0-d tensor")
        return batch.repeat_interleave(K, dim=0)
    if isinstance(batch, dict):
        return type(batch)((k, expand_rows(v, K)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(expand_rows(v, K) for v in batch))
    if isinstance(batch, (list, tuple)):
        if batch and not any(torch.is_tensor(v) or isinstance(v, (list, tuple, dict)) for v in batch):
            return type(batch)(v for v in batch for _ in range(K))  # per-sample items (captions)
        return type(batch)(expand_rows(v, K) for v in batch)
    raise TypeError(f"expand_rows: cannot lay out rows of a {type(batch).__name__}")


def _empty_rows(x):
    """Keep zero rows of a collated batch of one: tensors sliced, per-item lists (captions) emptied."""
    if torch.is_tensor(x):
        return x[:0]
    if isinstance(x, dict):
        return type(x)((k, _empty_rows(v)) for k, v in x.items())
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(_empty_rows(v) for v in x))
    if isinstance(x, (list, tuple)):
        if len(x) == 1 and not isinstance(x[0], (list, tuple, dict)) and not torch.is_tensor(x[0]):
            return type(x)()  # the batch's one non-tensor item (a caption, a path)
        return type(x)(_empty_rows(v) for v in x)
    return x


def _empty_like_batch(collate, dataset):
    """An empty batch with the right shapes and dtypes (collate one sample, keep zero rows)."""
    return _empty_rows(collate([dataset[0]]))


class _Plan:
    """The physical chunks of one epoch: [(step, indices, is_last), ...]."""

    def __init__(self, loader: "DPDataLoader", first_step: int, steps: int):
        self.chunks = []
        for s in range(first_step, first_step + steps):
            idx = loader.batch_indices(s)
            size = loader.max_physical_batch_size or max(1, len(idx))
            parts = [idx[i:i + size] for i in range(0, len(idx), size)] or [idx[:0]]
            for k, part in enumerate(parts):
                self.chunks.append((s, part.tolist(), k == len(parts) - 1, k == 0))


class _ChunkSampler:
    def __init__(self, plan: _Plan):
        self.plan = plan

    def __iter__(self):
        return (idx for _, idx, _, _ in self.plan.chunks)

    def __len__(self):
        return len(self.plan.chunks)


class DPDataLoader:
    """Iterates physical chunks of Poisson logical batches; ``len()`` is logical steps per epoch."""

    def __init__(self, dataset: Dataset, *, sample_rate: float, seed: int, steps_per_epoch: int,
                 max_physical_batch_size: int | None = None, collate_fn=None, num_workers: int = 0,
                 pin_memory: bool = False, worker_init_fn=None, rank: int = 0, world_size: int = 1,
                 optimizer=None, secure_key: bytes | None = None):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if max_physical_batch_size is not None and max_physical_batch_size < 1:
            raise ValueError(f"max_physical_batch_size must be >= 1, got {max_physical_batch_size}")
        self.dataset = dataset
        self._sample_rate = float(sample_rate)
        self.seed = int(seed)
        self.steps_per_epoch = int(steps_per_epoch)
        self.max_physical_batch_size = max_physical_batch_size
        self.collate_fn = collate_fn or torch.utils.data.default_collate
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.worker_init_fn = worker_init_fn
        self.rank, self.world_size = rank, world_size
        self.optimizer = optimizer
        self._secure_key = secure_key  # secure mode: membership from ChaCha20 under this key, not Philox
        self._drawn = 0  # high-water mark: logical steps below it were drawn and may not be drawn again
        self.step = 0  # the next logical step to draw (global, across epochs)
        self._generation = 0  # bumped by each new iterator: only the newest one may yield
        self.chunk_step: int | None = None  # the logical step of the chunk yielded last
        self.chunk_indices: list[int] = []  # its samples' indices in the data set (this rank's)

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def sample_rate(self) -> float:
        """The Poisson rate of every batch, fixed: the engine charges each release at it."""
        return self._sample_rate

    @sample_rate.setter
    def sample_rate(self, q) -> None:
        raise AttributeError(f"the loader's sampling rate is fixed at {self._sample_rate}: every release is charged "
                             "at it, so batches drawn at another rate would be under-charged; to change the batch "
                             "size, build a new engine that composes after this one (PrivacyEngine.compose_after)")

    def batch_indices(self, step: int) -> torch.Tensor:
        """This rank's members of the logical batch of ``step`` (sorted dataset indices)."""
        n = len(self.dataset)
        if self._secure_key is not None:
            from .random_secure import poisson_mask_secure

            mask = poisson_mask_secure(n, self.sample_rate, key=self._secure_key, step=step)
        else:
            mask = poisson_mask(n, self.sample_rate, seed=self.seed, step=step)
        idx = mask.nonzero().flatten()
        if self.world_size > 1:
            idx = idx[idx % self.world_size == self.rank]
        return idx


    def __iter__(self):
        # One live iterator at a time: an older one planned its steps from the same `self.step`, so
        # it would yield a logical step (a Poisson batch) that a newer one yields too.
        self._generation += 1
        generation = self._generation
        token = object()  # this iterator, for the optimizer (an id could be reused by another object)
        plan = _Plan(self, self.step, self.steps_per_epoch - (self.step % self.steps_per_epoch))
        if not plan.chunks:
            return
        loader = DataLoader(self.dataset, batch_sampler=_ChunkSampler(plan), collate_fn=self._collate_samples,
                            num_workers=self.num_workers, pin_memory=self.pin_memory,
                            worker_init_fn=self.worker_init_fn)
        for (step, idx, is_last, is_first), batch in zip(plan.chunks, loader):
            if generation != self._generation:
                raise DPError("this iterator over the private data loader was superseded (a newer iterator, or "
                              "load_state_dict moved the sampler), and it would yield logical steps planned "
                              "before that: use one iterator at a time, and start a new `for` loop after loading "
                              "a checkpoint")
            if not idx:
                batch = _empty_like_batch(self.collate_fn, self.dataset)
            if self.optimizer is not None:
                self.optimizer._announce_chunk(len(idx), is_last, step, is_first, batch, source=token)
            self._drawn = max(self._drawn, step + 1)  # after a refusal above, this step was never drawn
            # what the loop may key each record's training randomness on (dpfast.random.record_generators)
            self.chunk_step, self.chunk_indices = step, list(idx)
            if is_last:
                # advanced before the yield: a loop that stops (checkpoint, time budget) right after the
                # optimizer.step() of this chunk must resume at the next logical step
                self.step = step + 1
            yield batch

    def _collate_samples(self, samples):
        if not samples:
            return None  # replaced by an empty batch in __iter__ (workers cannot see the dataset's shape)
        return self.collate_fn(samples)

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "sample_rate": self.sample_rate,
                "dataset_size": len(self.dataset)}

    def check_state(self, sd: dict, seed: int | None = None) -> None:
        """Raises if ``load_state_dict(sd)`` would; ``seed``: the seed the loader will have by then."""
        seed = self.seed if seed is None else seed
        if sd["seed"] != seed or sd["sample_rate"] != self.sample_rate or sd["dataset_size"] != len(self.dataset):
            raise ValueError(
                f"sampler state is for seed={sd['seed']}, q={sd['sample_rate']}, N={sd['dataset_size']} but this "
                f"loader has seed={seed}, q={self.sample_rate}, N={len(self.dataset)}")
        if int(sd["step"]) < self._drawn:
            raise ValueError(f"sampler state is at step {sd['step']} but this loader already drew step "
                             f"{self._drawn - 1}: rewinding would release the same Poisson batches again. To roll "
                             "a run back, load the checkpoint into a new PrivacyEngine (with its ledger)")

    def load_state_dict(self, sd: dict) -> None:
        self.check_state(sd)
        self.step = int(sd["step"])
        # an iterator started before the load planned its steps from the old position: its remaining
        # steps may be ones the checkpointed run already released (the same Poisson batches again)
        self._generation += 1

    def __getstate__(self):
        if self._secure_key is not None:
            raise TypeError("a secure-mode DPDataLoader holds the secret ChaCha20 key and cannot be pickled; "
                            "checkpoint loader.state_dict() instead")
        return self.__dict__
