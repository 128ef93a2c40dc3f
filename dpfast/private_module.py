"""Make a module tree private in place: every trainable layer's forward goes through its rule.

The module object stays the same one (a drop-in: its class, attributes, state_dict keys and
``__call__`` are untouched); only the ``forward`` of each layer that has trainable parameters is
replaced by an instance attribute, and :meth:`PrivateModule.remove` puts them back.
"""
from __future__ import annotations

import contextlib
import types
import weakref

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ._precision import exact_fp32
from .module_checks import refuse_unsupported
from .errors import BatchLayoutError, DPError, PrivacyLeakError, UnsupportedModuleError
from .rules import SUPPORTED, find_rule
from .tape import Tape, fingerprint, fingerprints_match, input_fingerprint

_BATCHNORM = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)
_HALF = (torch.bfloat16, torch.float16)

# module -> its PrivateModule. Kept outside the modules so that copy.deepcopy(model) (an EMA copy, say)
# yields a plain, non-private model that computes with its own weights, never the original's tape.
_REGISTRY: "weakref.WeakKeyDictionary[nn.Module, PrivateModule]" = weakref.WeakKeyDictionary()


def _private_forward(module, *args, **kwargs):
    """Installed as each private layer's ``forward`` (bound to the layer, so a deep copy rebinds it)."""
    orig = type(module).forward.__get__(module, type(module))
    pm = _REGISTRY.get(module)
    if pm is None or not torch.is_grad_enabled():
        return orig(*args, **kwargs)
    rule, name = module._dpfast_rule
    if not pm.replaying:
        pm.snapshot_state()  # the model was entered through a submodule: the pass begins here
    tape = pm._replay_tape if pm.replaying else pm.tape
    return rule.forward(tape, module, name, orig, *args, **kwargs)


class _ReplayTape(Tape):
    """Two-pass mode, second pass: the forward is re-run and ``row_scale * dL/d(output)`` is
    backpropagated; each layer adds its weight gradient to the clipped sum. What the replay verifies
    before anything reaches the sum (anything else is refused with PrivacyLeakError):

    * the layers run in the first pass's order (same names);
    * per row, each layer's output gradient is the first pass's times that row's clip factor, and its
      input is the first pass's (squared norm and fixed random projections, :func:`dpfast.tape.fingerprint`);
      this catches randomness the replay cannot restore (Python's random, numpy, a private
      generator) and losses that reach the parameters other than through the returned outputs;
    * every layer that received a gradient in the first pass receives one in the replay;
    * the bound itself: each sample's norm is computed again from the replayed inputs and output
      gradients (the same rules and components as the first pass), and the step is refused if any
      exceeds ``bound`` (max_grad_norm, to float rounding). The fingerprints explain a failure; this
      check is what guarantees the sensitivity."""

    def __init__(self, tape: Tape, row_scale: torch.Tensor, accumulate, bound: float):
        super().__init__(tape.multiplicity, two_pass=False, backend=tape.backend, norm_method=tape.norm_method)
        self.can_materialize = False  # the replay adds each layer's clipped gradient as it comes
        self.expected = tape.sites
        self.low_precision = tape.low_precision
        self.row_scale = row_scale
        self.accumulate = accumulate
        self.bound = bound
        self.expected_rows = tape.rows

    def new_site(self, rule, name, targets, rows, **saved):
        k = len(self.sites)
        if k >= len(self.expected) or self.expected[k].name != name:
            raise PrivacyLeakError(
                f"two-pass replay: layer {name!r} ran where the first pass ran "
                f"{self.expected[k].name if k < len(self.expected) else 'nothing'!r}; the forward pass is not "
                "deterministic, so the replay cannot be trusted: use mode='bk'")
        return super().new_site(rule, name, targets, rows, **saved)

    def record_grad(self, site, G):
        first = self.expected[self.sites.index(site)]
        if first.fingerprint is None:
            raise PrivacyLeakError(f"two-pass replay: layer {site.name!r} received a gradient it did not "
                                   "receive in the first pass; use mode='bk'")
        # the replay's output gradient must be the first pass's times the clip factors, row by row
        r = self.row_scale.to(first.fingerprint.dtype).view(-1, 1)
        want = first.fingerprint * torch.cat([r.square(), r.expand(-1, first.fingerprint.shape[1] - 1)], dim=1)
        # bf16/fp16 would round the scaled gradients (two-pass refuses low precision before replaying)
        rtol = 1e-1 if (self.low_precision or G.dtype in _HALF) else 1e-3
        if not fingerprints_match(fingerprint(G), want, rtol):
            raise PrivacyLeakError(
                f"two-pass replay: the output gradient of layer {site.name!r} is not the first pass's scaled "
                "by the clip factors, so its per-sample norms would not bound the release; the step is "
                "refused. Two-pass mode needs the loss to depend on the parameters only through the model's "
                "returned outputs (none computed from another, nothing stashed on the module, one call per "
                "step, no randomness outside torch's global generator); use mode='bk' otherwise")
        want, got = first.input_fingerprint, input_fingerprint(site)
        if (want is None) != (got is None) or (want is not None and not fingerprints_match(got, want, 1e-4)):
            raise PrivacyLeakError(
                f"two-pass replay: the input of layer {site.name!r} differs from the first pass (randomness "
                "the replay does not restore: Python's random, numpy, a private torch.Generator, a counter on "
                "the module), so the replayed gradient is not the one whose norm was clipped; the step is "
                "refused. Draw all randomness from torch's global generator, or use mode='bk'")
        super().record_grad(site, G)  # norms of the replayed gradients, component by component

    def _finish_component(self, root: int) -> None:
        """Norms first (Tape), then the component's share of the sum, then its tensors are dropped."""
        if root in self._done:
            return
        super()._finish_component(root)
        for site in self._members[root]:
            if not site.received:
                continue
            ones = torch.ones(site.rows, dtype=torch.float32, device=self.row_scale.device)
            with exact_fp32():
                self.accumulate_later.append((site, site.rule.clipped_grads(site, self, ones)))
            site.rule.release(site)

    def finish_and_check(self) -> None:
        """After the replayed backward: every first-pass layer got a gradient, and every sample's
        replayed norm is within the bound; only then is anything added to the clipped sum."""
        missing = [e.name for e, s in zip(self.expected, self.sites + [None] * len(self.expected))
                   if e.fingerprint is not None and (s is None or not s.received)]
        if missing:
            raise PrivacyLeakError(f"two-pass replay: layers {missing[:5]} received no gradient in the replay "
                                   "but did in the first pass; the step is refused (use mode='bk')")
        sq = self.finish()
        worst = float(sq.max().sqrt()) if sq.numel() else 0.0
        if not worst <= self.bound * (1 + 1e-4) + 1e-12:
            raise PrivacyLeakError(
                f"two-pass replay: a sample's replayed gradient has norm {worst:.6g} > max_grad_norm "
                f"{self.bound:.6g}: the replay did not reproduce the first pass, and the step is refused "
                "(use mode='bk')")
        for site, grads in self.accumulate_later:
            for t, g in zip(site.targets, grads):
                self.accumulate(t, g)

    def reset(self) -> None:
        super().reset()
        self.accumulate_later: list = []


def check_module(module: nn.Module) -> list[str]:
    """Raise UnsupportedModuleError for the first layer dpfast cannot make private; returns the
    names of the layers it will make private."""
    names: list[str] = []
    _walk(module, "", names, install=None)
    return names


def _walk(module, name, names, install):
    label = name or type(module).__name__
    if isinstance(module, _BATCHNORM):
        raise UnsupportedModuleError(
            f"module {label!r} ({type(module).__name__}) normalises over the batch, which mixes samples "
            "and cannot be made private; replace it with GroupNorm: model = dpfast.fix_module(model)")
    rule = find_rule(module)
    refuse_unsupported(module, label, rule)
    if rule is not None:
        rule.check(module, label)
        if any(p.requires_grad for p in rule.covered_params(module)):
            names.append(label)
            if install is not None:
                install(module, label, rule)
        if rule.composite:
            return
    else:
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own:
            why = ""
            base = [t.__name__ for t in (nn.Linear, nn.Conv2d, nn.Conv1d, nn.GroupNorm, nn.LayerNorm,
                                         nn.Embedding) if isinstance(module, t)]
            if base:
                why = (f" It subclasses nn.{base[0]} but overrides forward, so the nn.{base[0]} rule would "
                       "not compute what it computes.")
            raise UnsupportedModuleError(
                f"module {label!r} ({type(module).__name__}) has trainable parameters {own} but no "
                f"per-sample gradient rule.{why} dpfast has rules for {SUPPORTED}. Build the module from "
                f"those layers, or freeze these parameters (p.requires_grad_(False)) if they should not train.")
    for child_name, child in module.named_children():
        _walk(child, f"{name}.{child_name}" if name else child_name, names, install)


class PrivateModule:
    """Owns the tape of the current step, the installed forwards and the two-pass replay."""

    def __init__(self, module: nn.Module, *, multiplicity: int, mode: str, backend: str,
                 norm_method="auto", max_materialized_bytes: int | None = None):
        if _REGISTRY.get(module) is not None:
            raise DPError("this module is already private (make_private was called on it before); "
                          "call dpfast.remove_private(module) first or build a fresh model")
        self.module = module
        self.mode = mode
        self.tape = Tape(multiplicity, two_pass=(mode == "two-pass"), backend=backend, norm_method=norm_method,
                         max_materialized_bytes=max_materialized_bytes)
        self.replaying = False
        self._replay_tape: _ReplayTape | None = None
        self._installed: list[nn.Module] = []
        self._call: tuple | None = None      # (args, kwargs, rng) of the last top-level forward
        self._out_grads: dict[int, torch.Tensor] = {}
        self._out_leaves: list = []
        self._loader_batch: list = []        # tensors of the chunk the loader yielded (layout check)
        self._state0: dict | None = None     # parameter/buffer versions when the pass began
        self.layer_names: list[str] = []
        _walk(module, "", [], install=None)  # every check first: a refusal leaves the model untouched
        _walk(module, "", self.layer_names, install=self._install)
        ref = weakref.ref(self)

        # plain functions, not bound methods: a deep copy of the model shares them, and they ignore
        # any module but this one
        def pre(mod, args, kwargs):
            pm = ref()
            return pm._pre_forward(mod, args, kwargs) if pm is not None and mod is pm.module else None

        def post(mod, args, kwargs, output):
            pm = ref()
            return pm._post_forward(mod, args, kwargs, output) if pm is not None and mod is pm.module else None

        self._hooks = [module.register_forward_pre_hook(pre, with_kwargs=True),
                       module.register_forward_hook(post, with_kwargs=True)]
        _REGISTRY[module] = self

    # -------------------------------------------------------------- install
    def _install(self, module: nn.Module, name: str, rule) -> None:
        module._dpfast_rule = (rule, name)
        module.forward = types.MethodType(_private_forward, module)
        _REGISTRY[module] = self
        self._installed.append(module)

    def remove(self) -> None:
        for m in self._installed:
            del m.forward  # the instance attribute; the class forward shows through again
            del m._dpfast_rule
            _REGISTRY.pop(m, None)
        for h in self._hooks:
            h.remove()
        self._installed.clear()
        _REGISTRY.pop(self.module, None)

    # -------------------------------------------------------------- the loader's chunk
    def expect_chunk(self, samples: int | None, batch) -> None:
        """The next forward is of a loader chunk of ``samples`` samples (None: no loader chunk)."""
        K = self.tape.multiplicity
        self.tape.expected_rows = None if samples is None else samples * K
        self._loader_batch = [t for t in pytree.tree_leaves(batch) if torch.is_tensor(t)] \
            if samples is not None and samples > 1 and K > 1 else []

    def _check_row_layout(self, args, kwargs) -> None:
        """A model input that is a loader tensor ``repeat``ed K times (rows k*n + i are sample i)
        instead of ``repeat_interleave``d (rows i*K + k) would let one record steer K rows that are
        clipped as parts of K different samples: influence K*C. Refuse it where it is visible.

        A heuristic, not a guarantee: it sees only an unmodified copy (not one that was scaled or
        noised after the repeat), and only floating tensors with several values per row (integer labels
        or per-row timestep bins such as ``arange(K).repeat(n)`` match a repeat by chance). The sure
        way is to build rows with :func:`dpfast.expand_rows`."""
        K = self.tape.multiplicity
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if torch.is_tensor(t)]
        for b in self._loader_batch:
            if not b.is_floating_point() or b.dim() < 2 or b[0].numel() < 2:
                continue
            n = b.shape[0]
            for t in inputs:
                if t.dim() == 0 or t.shape[0] != n * K or t.shape[1:] != b.shape[1:] or t.dtype != b.dtype:
                    continue
                if torch.equal(t, b.repeat(K, *([1] * (b.dim() - 1)))) and \
                        not torch.equal(t, b.repeat_interleave(K, 0)):
                    raise BatchLayoutError(
                        f"a model input is the batch repeated {K} times (x.repeat(K, ...)): with multiplicity "
                        f"K={K} rows i*K .. i*K+K-1 must be sample i, so build them with "
                        "dpfast.expand_rows(x, K) (x.repeat_interleave(K, 0)); otherwise one record's influence "
                        f"is {K} x max_grad_norm")
        self._loader_batch = []

    # -------------------------------------------------------------- state written by the private pass
    def snapshot_state(self, force: bool = False) -> None:
        """Remember every parameter's and persistent buffer's identity and version counter: taken when
        the loader announces a chunk (before the user sees it), else at the first forward of the pass."""
        if force or self._state0 is None:
            self._state0 = self._state_versions()

    def _state_versions(self) -> dict:
        out = {}
        for prefix, m in self.module.named_modules():
            dot = prefix + "." if prefix else ""
            for n, p in m._parameters.items():
                if p is not None:
                    out[dot + n] = (p, p._version)
            for n, b in m._buffers.items():
                if b is not None and n not in m._non_persistent_buffers_set:
                    out[dot + n] = (b, b._version)
        return out

    def written_state(self) -> list[str]:
        """Parameters and persistent buffers written (in place or reassigned) since the snapshot: a
        running statistic, a codebook row reset to a record, anything computed from the private batch
        and kept in the model would be released with it, unclipped and unnoised."""
        before, self._state0 = self._state0, None
        if before is None:
            return []
        now = self._state_versions()
        changed = [n for n, (t, v) in before.items() if n not in now or now[n][0] is not t or t._version != v]
        return changed + [n for n in now if n not in before]

    # -------------------------------------------------------------- top-level forward
    def _pre_forward(self, module, args, kwargs):
        if self.replaying or not torch.is_grad_enabled():
            return None
        # a new pass begins here: what happened before it (an EMA swap, a state dict loaded) is not part
        # of it; what the forward, backward and loss write until step() is
        self.snapshot_state(force=True)
        if self._loader_batch:
            self._check_row_layout(args, kwargs)
        if any(s.received for s in self.tape.sites):
            raise DPError(
                "the private model was called again after backward and before optimizer.step(): each "
                "step is one forward, one backward, one optimizer.step() (put all rows of a step in one "
                "batch: per-sample clipping needs every row of a sample in the same pass)")
        self.tape.reset()  # a forward that never reached backward (e.g. a validation pass) is dropped
        if self.tape.expected_rows is None:
            # no loader announced this chunk: the batch rows are dim 0 of the model's first tensor input,
            # and every trainable layer must see that many (a layer fed (L, N, E) is refused unless L == N)
            bdim = 1 if getattr(module, "batch_first", True) is False else 0  # nn.MultiheadAttention's own
            first = next((t for t in pytree.tree_leaves((args, kwargs)) if torch.is_tensor(t) and t.dim() > bdim),
                         None)
            self.tape.input_rows = None if first is None else first.shape[bdim]
        self._out_grads.clear()
        if self.mode == "two-pass":
            rng = (torch.get_rng_state(),
                   torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
            # the replay must run under the same autocast state as this forward
            autocast = [(dt, torch.get_autocast_dtype(dt)) for dt in ("cpu", "cuda")
                        if torch.is_autocast_enabled(dt)]
            self._call = (args, kwargs, rng, autocast)
        return None

    def _post_forward(self, module, args, kwargs, output):
        if self.replaying or not torch.is_grad_enabled() or self.mode != "two-pass":
            return None
        leaves, _ = pytree.tree_flatten(output)
        self._out_leaves = [i for i, t in enumerate(leaves) if torch.is_tensor(t) and t.requires_grad]
        for i in self._out_leaves:
            leaves[i].register_hook(self._grad_catcher(i))
        return None

    def _grad_catcher(self, i):
        def hook(g):
            self._out_grads[i] = g.detach()
        return hook

    def replay(self, row_scale: torch.Tensor, accumulate, bound: float) -> None:
        """Two-pass mode: re-run the last forward and backpropagate ``row_scale * dL/d(output)``;
        every layer checks its gradient against the first pass and hands ``accumulate(target, grad)``
        its share of the clipped sum."""
        if not any(s.received for s in self.tape.sites):
            return
        if self.tape.low_precision:
            raise PrivacyLeakError(
                "two-pass mode under bf16/fp16 autocast is refused: its second backward carries the "
                "clip-scaled gradients through the model in low precision, and their rounding (1-2% per "
                "row after a few layers) lets a sample's contribution exceed max_grad_norm, which the "
                "noise does not cover. Use mode='bk' (the default): it clips and sums in fp32")
        if self._call is None or not self._out_grads:
            raise DPError("two-pass mode found no output tensor of the model that the loss depends on (the "
                          "outputs must be tensors, or tuples/lists/dicts of tensors); use mode='bk'")
        args, kwargs, (cpu_rng, cuda_rng), autocast = self._call
        now = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda_rng is not None else None)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        self.replaying = True
        self._replay_tape = replay_tape = _ReplayTape(self.tape, row_scale, accumulate, bound)
        try:
            with torch.enable_grad(), contextlib.ExitStack() as stack:
                for device_type, dtype in autocast:
                    stack.enter_context(torch.autocast(device_type, dtype=dtype))
                out = self.module(*args, **kwargs)
        finally:
            self.replaying = False
            self._replay_tape = None
            torch.set_rng_state(now[0])
            if now[1] is not None:
                torch.cuda.set_rng_state_all(now[1])
        leaves, _ = pytree.tree_flatten(out)
        outs, grads = [], []
        for i, g in self._out_grads.items():
            t = leaves[i]
            if t.shape[0] != row_scale.shape[0]:
                raise BatchLayoutError(
                    f"two-pass mode needs the model's outputs to have the batch rows first; output {i} has "
                    f"shape {tuple(t.shape)} for {row_scale.shape[0]} rows")
            outs.append(t)
            grads.append(g * row_scale.to(g.dtype).view(-1, *([1] * (g.dim() - 1))))
        self._call = None
        self._out_grads.clear()
        torch.autograd.backward(outs, grads)
        replay_tape.finish_and_check()


def remove_private(module: nn.Module) -> nn.Module:
    """Undo make_private on a module: original forwards back, hooks removed."""
    pm = _REGISTRY.get(module)
    if pm is not None:
        pm.remove()
    return module
