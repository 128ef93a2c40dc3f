"""The book-keeping tape: what one forward/backward of a private module leaves for the optimizer.

Forward: every application of a trainable layer registers a :class:`Site` (the activation it needs,
the parameters it produces gradients for). Backward: the layer's custom autograd function returns
the input gradient only (no weight gradient is computed) and hands its output gradient ``G`` to the
tape, which adds the layer's per-sample squared norm to ``sq_norms`` right away. After backward the
optimizer asks the tape for the clipped sum: one weight-gradient computation per site with the rows
of ``G`` scaled by their sample's clip factor.

Parameters used by several sites (a module called twice, tied weights) get the norm of the *sum* of
their per-sample gradients, never the sum of norms: such sites form one component and their
per-sample gradients are summed chunk by chunk before squaring.
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
from typing import Any

import torch

from ._precision import exact_fp32
from .errors import BatchLayoutError, DPError, UnsupportedModuleError


@dataclass(eq=False)
class Target:
    """A parameter (or a block of rows of it) that a site produces a gradient for."""

    param: torch.nn.Parameter
    rows: slice | None = None  # a block of dim 0 (packed q/k/v projections); None: the whole tensor

    @property
    def key(self) -> tuple:
        if self.rows is None:
            return (id(self.param), None, None)
        return (id(self.param), self.rows.start, self.rows.stop)

    @property
    def shape(self) -> torch.Size:
        if self.rows is None:
            return self.param.shape
        return self.param[self.rows].shape


@dataclass(eq=False)
class Site:
    rule: Any                      # the rule object (dpfast.rules.*) that knows this layer's maths
    name: str                      # module path, for error messages
    targets: list[Target]
    rows: int
    saved: dict = field(default_factory=dict)
    G: torch.Tensor | None = None
    received: bool = False
    epoch: int = 0
    # two-pass: per-row fingerprints of G and of the layer's input, checked by the replay
    fingerprint: torch.Tensor | None = None
    input_fingerprint: torch.Tensor | None = None
    # dpfast.plan: "ghost" / "direct" / "auto" for the rule's norm; per-sample gradients when materialized
    method: str = "auto"
    materialized: list | None = None
    variant: str | None = None     # how the rule forms per-sample gradients (its psg_variants)
    pending: Any = None            # what a layer's backward computed for its rule's absorb (after the checks)


class Tape:
    """Sites of one forward pass; per-sample squared norms accumulated during backward."""

    can_materialize = True  # the two-pass replay tape sets it False: its sites are summed as they come

    def __init__(self, multiplicity: int, two_pass: bool, backend: str, norm_method="auto",
                 max_materialized_bytes: int | None = None):
        from .plan import DEFAULT_EXTRA_BYTES

        self.multiplicity = multiplicity
        self.two_pass = two_pass
        self.backend = backend
        self.norm_method = norm_method  # "auto", a strategy, or {layer name or glob: either}
        self.max_extra_bytes = DEFAULT_EXTRA_BYTES if max_materialized_bytes is None else max_materialized_bytes
        self.last_plan: list[dict] = []  # per single-site layer of the last step: name, strategy, timings
        # rows of the current physical chunk (samples x K) when the private loader announced it; every
        # layer's row count is checked against it at its forward (a layer that sees positions or a
        # reshaped batch in dim 0 is refused, whatever the other layers see)
        self.expected_rows: int | None = None
        self.reset()

    def reset(self) -> None:
        if getattr(self, "_plan_now", None):
            self.last_plan = self._plan_now
        self._plan_now: list[dict] = []
        self._extra_bytes = 0  # what materialized layers hold beyond what they freed, this pass
        self._holders: dict | None = None
        self.epoch = getattr(self, "epoch", 0) + 1
        self.sites: list[Site] = []
        self.rows: int | None = None
        self.input_rows: int | None = None  # without a loader: dim 0 of the model's first input
        self.sq_norms: torch.Tensor | None = None
        self.sealed = False          # set at the first backward: no more sites may be added
        self.low_precision = False   # some output gradient was bf16/fp16 (autocast)
        self._component: dict[int, int] = {}
        self._members: dict[int, list[Site]] = {}
        self._pending: dict[int, int] = {}
        self._done: set[int] = set()

    # ---------------------------------------------------------------- forward
    def new_site(self, rule, name: str, targets: list[Target], rows: int, **saved) -> Site:
        if self.sealed:
            raise UnsupportedModuleError(
                f"module {name!r} ran forward during backward (activation checkpointing recomputes "
                "the forward pass); dpfast does not support checkpointing inside a private module yet: "
                "disable gradient checkpointing, or use mode='two-pass' with a smaller "
                "max_physical_batch_size to save memory")
        want = self.expected_rows if self.expected_rows is not None else self.input_rows
        if want is not None and rows != want:
            where = (f"the batch holds {want} rows (samples x multiplicity {self.multiplicity})"
                     if self.expected_rows is not None else f"the model's first input has {want} rows in dim 0")
            raise BatchLayoutError(
                f"module {name!r} received {rows} rows in dim 0 but {where}: every trainable layer must see the "
                "batch rows in dim 0 (sequence-first (L, N, E) inputs put positions there: use batch_first=True)")
        if self.rows is None:
            self.rows = rows
            if rows % self.multiplicity:
                raise BatchLayoutError(
                    f"the batch has {rows} rows, not a multiple of multiplicity={self.multiplicity}: "
                    "rows i*K .. i*K+K-1 must be the K copies of sample i")
        elif rows != self.rows:
            raise BatchLayoutError(
                f"module {name!r} received {rows} rows in dim 0 but earlier layers received {self.rows}; "
                "every trainable layer's input must have the batch rows first (a tensor shared by all "
                "samples, or a reshaped batch, cannot be attributed to samples)")
        site = Site(rule, name, targets, rows, saved, epoch=self.epoch)
        self.sites.append(site)
        return site

    # ---------------------------------------------------------------- backward
    def _seal(self) -> None:
        """Group sites that share a parameter into components (union-find over target keys)."""
        self.sealed = True
        owners: dict[int, list[tuple[tuple, int]]] = {}  # parameter id -> [(target key, site index)]
        parent = list(range(len(self.sites)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for i, site in enumerate(self.sites):
            for t in site.targets:
                seen = owners.setdefault(id(t.param), [])
                for key, j in seen:
                    if _overlaps(key, t.key):
                        parent[find(i)] = find(j)
                seen.append((t.key, i))
        for i, site in enumerate(self.sites):
            root = find(i)
            self._component[id(site)] = root
            self._members.setdefault(root, []).append(site)
        self._pending = {root: len(m) for root, m in self._members.items()}

    def record_grad(self, site: Site, G: torch.Tensor) -> None:
        """Called by a layer's backward with its output gradient (rows first)."""
        if site.epoch != self.epoch:
            raise DPError(
                f"module {site.name!r} got a gradient from a forward pass the tape no longer holds: the "
                "model was called again (or optimizer.zero_grad()/step() ran) between this forward and its "
                "backward. Call the private model once per step: forward, backward, optimizer.step()")
        if not self.sealed:
            self._seal()
        if site.received:
            raise UnsupportedModuleError(
                f"module {site.name!r} received a second output gradient in one step: call backward "
                "once per forward (retain_graph and double backward are not supported)")
        site.received = True
        if self.two_pass:
            site.fingerprint = fingerprint(G)
            site.input_fingerprint = input_fingerprint(site)
            self.low_precision |= G.dtype in (torch.bfloat16, torch.float16)
        site.rule.absorb(site, G.detach())
        root = self._component[id(site)]
        self._pending[root] -= 1
        if self._pending[root] == 0:
            self._finish_component(root)

    def _add_norms(self, sq: torch.Tensor) -> None:
        if self.sq_norms is None:
            self.sq_norms = torch.zeros_like(sq)
        self.sq_norms += sq.to(self.sq_norms.dtype)

    def _finish_component(self, root: int) -> None:
        if root in self._done:
            return
        self._done.add(root)
        members = [s for s in self._members[root] if s.received]
        if not members or not self.rows:
            return
        # named for profilers (the benchmark harness reports the norm share of a step from it); opened only
        # under one, as it costs 10 us per layer per step otherwise
        named = torch.profiler.record_function("dpfast::norm") if torch.autograd._profiler_enabled() \
            else contextlib.nullcontext()
        with named, exact_fp32():
            if len(members) == 1:
                self._add_norms(self._single_norm_sq(members[0]))
            else:
                self._add_norms(self._shared_norm_sq(members))
        if self.two_pass:
            for s in members:
                s.rule.release(s)

    def method_of(self, site: Site) -> str:
        """The norm a rule with a ghost and a direct form computes for ``site``: "ghost", "direct", or
        "auto" (the FLOP model of :mod:`dpfast.rules._norms`)."""
        return site.method

    def _single_norm_sq(self, site: Site) -> torch.Tensor:
        """A layer whose parameters no other site touches: norm by the strategy :mod:`dpfast.plan`
        chooses (forced by ``norm_method``, else measured once per layer shape and remembered)."""
        from . import plan

        forced = plan.forced_strategy(self.norm_method, site.name)
        n = self.rows // self.multiplicity
        if forced in ("ghost", "direct"):  # nothing to weigh against the memory budget
            return self._run_strategy(site, forced, n, 0, 0, None)
        psg_bytes, freed = self._materialize_bytes(site, n)
        fits = self.can_materialize and not self.two_pass and \
            self._extra_bytes + psg_bytes - freed <= self.max_extra_bytes
        entry = None
        if forced != "auto":
            strategy = forced
            if strategy == "materialize" and not fits:  # forced or not, the budget holds
                strategy = "direct"
            if strategy == "materialize":  # the measured way to form them, where there is one
                entry = plan.planner().lookup(plan.shape_key(site, self.multiplicity, self.backend))
        else:
            key = plan.shape_key(site, self.multiplicity, self.backend)
            entry = plan.planner().lookup(key)
            if entry is None or (fits and "materialize" not in entry["times"]):
                return self._calibrate(site, key, n, fits)  # new, or measured when it could not materialize
            strategy = entry["strategy"]
            if strategy == "materialize" and not fits:
                rest = {k: v for k, v in entry["times"].items() if k != "materialize"}
                strategy = min(rest, key=rest.get) if rest else "auto"
        return self._run_strategy(site, strategy, n, psg_bytes, freed, entry)

    def _run_strategy(self, site, strategy, n, psg_bytes, freed, entry, sq=None, psg=None):
        if strategy in ("ghost", "auto") and not _two_forms(site):
            strategy = "direct"  # the rule has one norm of its own (norm layers, embeddings)
        self._plan_now.append({"layer": site.name, "rule": type(site.rule).__name__, "strategy": strategy,
                               "samples": n, "times": dict(entry["times"]) if entry else None,
                               "materialized_bytes": psg_bytes if strategy == "materialize" else 0,
                               "variant": None})
        if strategy == "materialize":
            if psg is None:
                variants = _variants(site, self)
                site.variant = entry.get("variant") if entry and entry.get("variant") in variants else variants[0]
                psg = site.rule.per_sample_grads(site, self, slice(0, n))
            if sq is None:
                sq = _sum_sq(psg)
            site.materialized = psg
            self._plan_now[-1]["variant"] = site.variant
            site.rule.release(site)  # its input and output gradient are no longer needed
            self._extra_bytes += psg_bytes - freed
            return sq
        site.method = strategy if strategy in ("ghost", "direct") else "auto"
        return sq if sq is not None else site.rule.norm_sq(site, self)

    def _materialize_bytes(self, site: Site, n: int) -> tuple[int, int]:
        """(bytes of the layer's per-sample gradients, bytes freed by releasing its saved tensors)."""
        acc = 8 if any(t.param.dtype == torch.float64 for t in site.targets) else 4
        psg = n * sum(t.shape.numel() for t in site.targets) * acc
        if self._holders is None:  # how many sites hold each saved storage (once per pass)
            self._holders = {}
            for o in self.sites:
                for t in o.saved.values():
                    if torch.is_tensor(t):
                        ptr = t.untyped_storage().data_ptr()
                        self._holders[ptr] = self._holders.get(ptr, 0) + 1
        freed = site.G.numel() * site.G.element_size() if site.G is not None else 0
        for k in self.ROW_TENSORS + ("xh", "idx"):
            t = site.saved.get(k)
            if torch.is_tensor(t) and self._holders.get(t.untyped_storage().data_ptr(), 0) <= 1:
                freed += t.numel() * t.element_size()  # no other site keeps it alive
        return psg, freed

    def _calibrate(self, site: Site, key: str, n: int, fits: bool) -> torch.Tensor:
        """Times every strategy on this step's tensors (twice, the faster of the two), and for
        materialize every way the rule has of forming per-sample gradients; records the fastest per
        sample, and goes on with it. Only the machine's speed decides, never the values. Each
        candidate's per-sample gradients are dropped as soon as they are timed (one layer's at a
        time, as in a step), and formed again if materialize wins."""
        from . import plan

        dev = next(t.device for t in [site.G, *site.saved.values()] if torch.is_tensor(t))
        two_forms = _two_forms(site) and site.saved.get("has_w")
        ones = torch.ones(self.rows, dtype=torch.float32, device=dev)
        times: dict[str, float] = {}
        results: dict[str, torch.Tensor] = {}
        variants = _variants(site, self)
        by_variant: dict[str, float] = {}
        for _ in range(2):
            for m in _plausible_norms(site, self) if two_forms else ("direct",):
                site.method = m if two_forms else "auto"
                results[m], t = plan.timed(lambda: site.rule.norm_sq(site, self), dev)
                times[m] = min(times.get(m, float("inf")), t)
            _, t_sum = plan.timed(lambda: site.rule.clipped_grads(site, self, ones), dev)
            times["sum"] = min(times.get("sum", float("inf")), t_sum)
            for v in variants if fits else ():
                site.variant = v
                (psg, _), t = plan.timed(lambda: _psg_and_sq(site, self, n), dev)
                _, t_mv = plan.timed(lambda: _materialized_sums(psg, ones[:n]), dev)
                psg = None  # dropped before the next candidate forms its own
                by_variant[v] = min(by_variant.get(v, float("inf")), t + t_mv)
        variant = min(by_variant, key=by_variant.get) if by_variant else None
        if variant is not None:
            times["materialize"] = by_variant[variant]
        t_sum = times.pop("sum")
        per_sample = {m: (t + (0.0 if m == "materialize" else t_sum)) / max(1, n) for m, t in times.items()}
        entry = plan.planner().record(key, per_sample, variant=variant)
        strategy = entry["strategy"]
        psg_bytes, freed = self._materialize_bytes(site, n)
        return self._run_strategy(site, strategy, n, psg_bytes, freed, entry, sq=results.get(strategy))

    def _shared_norm_sq(self, members: list[Site]) -> torch.Tensor:
        """Norm of each sample's gradient of every parameter the members touch, chunk by chunk.

        A site's target is a whole parameter or a block of its rows (the packed q/k/v projection of
        an attention called once as self-attention and once with another key/value). Contributions
        are added into one per-sample gradient of the *whole* parameter before squaring, so the cross
        terms between a whole-tensor site and a block site are counted. (Summing per target key
        instead lost them: one sample released 1.21 max_grad_norm.)"""
        K = self.multiplicity
        n = self.rows // K
        params = {id(t.param): t.param for s in members for t in s.targets}
        from .rules import _norms

        total = sum(p.numel() for p in params.values())
        step = max(1, _norms.get_memory_budget() // max(1, total))
        dev = members[0].G.device
        out = torch.zeros(n, dtype=torch.float64 if members[0].G.dtype == torch.float64 else torch.float32,
                          device=dev)
        for start in range(0, n, step):
            sl = slice(start, min(n, start + step))
            sums: dict[int, torch.Tensor] = {}
            for s in members:
                for t, g in zip(s.targets, s.rule.per_sample_grads(s, self, sl)):
                    acc = sums.get(id(t.param))
                    if acc is None:
                        acc = sums[id(t.param)] = g.new_zeros((g.shape[0], *t.param.shape))
                    if t.rows is None:
                        acc += g
                    else:
                        acc[:, t.rows] += g
            for g in sums.values():
                out[sl] += g.reshape(g.shape[0], -1).to(out.dtype).square().sum(dim=1)
        return out

    def finish(self) -> torch.Tensor:
        """After backward: complete components whose sites did not all receive gradients.

        Returns the raw per-sample squared norms (B,) (zeros for an empty batch or no trainable site).
        """
        if not self.sealed and self.sites:
            self._seal()
        for root in list(self._members):
            self._finish_component(root)
        if self.sq_norms is None:
            n = (self.rows or 0) // self.multiplicity
            self.sq_norms = torch.zeros(n)
        return self.sq_norms

    ROW_TENSORS = ("A", "x", "gw", "gb")

    def drop_rows(self, bad_rows: torch.Tensor) -> None:
        """Zero the saved rows of samples that are dropped (non-finite), so NaN * 0 cannot leak in."""
        bad_samples = bad_rows.view(-1, self.multiplicity).any(dim=1)
        for site in self.sites:
            if site.materialized is not None:
                site.materialized = [g.masked_fill(bad_samples.to(g.device).view(-1, *([1] * (g.dim() - 1))), 0)
                                     for g in site.materialized]
            if site.G is not None:
                site.G = site.G.masked_fill(bad_rows.view(-1, *([1] * (site.G.dim() - 1))), 0)
            for k in self.ROW_TENSORS:
                t = site.saved.get(k)
                if t is not None and t.is_floating_point():
                    site.saved[k] = t.masked_fill(bad_rows.view(-1, *([1] * (t.dim() - 1))), 0)

    def clipped_sums(self, row_scale: torch.Tensor, accumulate) -> None:
        """For every site that received a gradient: ``accumulate(target, sum_r row_scale[r] * grad_r)``."""
        with exact_fp32():
            per_sample = None
            for site in self.sites:
                if not site.received:
                    continue
                if site.materialized is not None:
                    if per_sample is None:
                        per_sample = _per_sample_scale(row_scale, self.multiplicity)
                    for t, g in zip(site.targets, _materialized_sums(site.materialized, per_sample)):
                        accumulate(t, g)
                    site.materialized = None
                    continue
                for t, g in zip(site.targets, site.rule.clipped_grads(site, self, row_scale)):
                    accumulate(t, g)
                site.rule.release(site)


def _two_forms(site: Site) -> bool:
    """Whether the site's rule has both a ghost and a direct norm (Linear and conv layers)."""
    from .rules.conv import ConvRule
    from .rules.linear import LinearRule

    return isinstance(site.rule, (LinearRule, ConvRule))


# A norm form whose FLOP count (dpfast.rules._norms) is more than this many times the other's is not
# timed: the ghost norm of a 3x3 conv at 28x28 models 27x the direct one's and measures ~20x, and
# timing it costs more than the rest of the calibration together, with Gram matrices in fp64 as the
# largest tensors of the step. The choice among the forms left is measured as ever.
HOPELESS = 8.0


def _plausible_norms(site: Site, tape: Tape) -> tuple:
    """The norm forms of a two-form rule worth timing: both, unless one's FLOP model is HOPELESS."""
    from .rules import _norms

    T, d, p = site.rule.norm_shape(site, tape)
    ghost, direct = _norms.ghost_cost(T, d, p), _norms.direct_cost(T, d, p)
    if ghost > HOPELESS * direct:
        return ("direct",)
    if direct > HOPELESS * ghost:
        return ("ghost",)
    return ("ghost", "direct")


def _variants(site: Site, tape: Tape) -> tuple:
    """The rule's ways of forming per-sample gradients (the first is its default)."""
    fn = getattr(site.rule, "psg_variants", None)
    return fn(site, tape) if fn is not None else ("default",)


def _sum_sq(grads: list[torch.Tensor]) -> torch.Tensor:
    """(B,) squared norm of each sample's gradient over all of a site's targets."""
    out = 0
    for g in grads:
        out = out + g.reshape(g.shape[0], -1).square().sum(dim=1)
    return out


def _psg_and_sq(site: Site, tape: Tape, n: int):
    psg = site.rule.per_sample_grads(site, tape, slice(0, n))
    return psg, _sum_sq(psg)


def _materialized_sums(grads: list[torch.Tensor], s: torch.Tensor) -> list[torch.Tensor]:
    """``sum_i s[i] * grads[i]`` for each target: one matrix-vector product, in the gradients' dtype
    (fp32, or fp64 for fp64 layers)."""
    return [(s.to(g.dtype) @ g.reshape(g.shape[0], -1)).view(g.shape[1:]) for g in grads]


def _per_sample_scale(row_scale: torch.Tensor, K: int) -> torch.Tensor:
    """The optimizer's row scale is each sample's factor repeated over its K rows; a materialized
    gradient is the sum over those rows, so it can only take a factor that is the same for all K."""
    rs = row_scale.reshape(-1, K)
    if K > 1 and not torch.equal(rs, rs[:, :1].expand_as(rs)):
        raise DPError("internal: a materialized layer got different scales for the rows of one sample")
    return rs[:, 0]


_PROJECTIONS: dict = {}


N_PROJECTIONS = 4


def fingerprint(x: torch.Tensor) -> torch.Tensor:
    """Per-row fingerprint of a tensor with rows first (R, 1 + N_PROJECTIONS), in fp64: the squared
    norm and projections on fixed standard-normal directions (each of the size of the row's norm).
    The two-pass replay compares the first pass's with the replay's, for each layer's output gradient
    and input: equal norms alone would let a sign flip or a permutation within a row through."""
    x = x.detach().reshape(x.shape[0], -1).double()
    key = (x.shape[1], x.device)
    w = _PROJECTIONS.get(key)
    if w is None:
        gen = torch.Generator().manual_seed(0x5EED)
        w = _PROJECTIONS[key] = torch.randn(x.shape[1], N_PROJECTIONS, generator=gen,
                                            dtype=torch.float64).to(x.device)
    return torch.cat([x.square().sum(dim=1, keepdim=True), x @ w], dim=1)


def fingerprints_match(got: torch.Tensor, want: torch.Tensor, rtol: float) -> bool:
    """Every column equal to ``rtol`` of the row's scale, in the column's own units: squared norm for
    the first, norm for the projections (a difference d moves a projection by about |d|)."""
    if got.shape != want.shape:
        return False
    sq = want[:, :1].abs()
    norm = sq.sqrt()
    tol = torch.cat([rtol * sq + rtol * 1e-3 * sq.max(),
                     (rtol * norm + rtol * 1e-3 * norm.max()).expand(-1, want.shape[1] - 1)], dim=1) + 1e-30
    return bool(((got - want).abs() <= tol).all())


INPUT_KEYS = ("A", "x", "xh", "idx")  # what each rule saves of its layer's input (linear, conv, norm, embedding)
def input_fingerprint(site: Site) -> torch.Tensor | None:
    """:func:`fingerprint` of a layer's input as its rule saved it (None if it saves none).

    Randomness the replay cannot restore (Python's `random`, numpy, a private generator, a counter on
    the module) may change a layer's input while its output gradient stays the same (a loss linear in
    the output), and the replayed weight gradient would then not be the one whose norm was clipped."""
    x = next((site.saved[k] for k in INPUT_KEYS if torch.is_tensor(site.saved.get(k))), None)
    return None if x is None else fingerprint(x)


def _overlaps(a: tuple, b: tuple) -> bool:
    if a[1] is None or b[1] is None:
        return True
    return a[1] < b[2] and b[1] < a[2]
