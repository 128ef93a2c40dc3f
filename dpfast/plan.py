"""Per layer, the cheapest exact way to get each sample's gradient norm and the clipped sum.

Three strategies, all exact (they differ only in float rounding, in fp32 or fp64):

* ``ghost``: the norm from Gram matrices of the layer's input and output gradient, ``T^2 (d + p)``
  per sample, no per-sample gradient; the clipped sum is one weight-gradient call with each row of
  the output gradient scaled by its sample's clip factor (:meth:`Rule.clipped_grads`).
* ``direct``: the norm of each sample's gradient formed chunk by chunk and thrown away
  (``T d p`` per sample); the clipped sum is the same weight-gradient call.
* ``materialize``: each sample's gradient of this layer only is formed once and kept until the
  clip factors are known; its norm and the clipped sum (``s @ grads``, a matrix-vector product) both
  come from it. One per-sample weight gradient instead of two weight-gradient-sized computations,
  for ``B x P_layer`` memory. The layer's saved input and output gradient are freed at once, so where
  ``P_layer < T (d + p)`` (convolutions at high resolution) it saves memory as well as time.

``auto`` picks per layer. The choice is measured, not modelled: the first time a layer shape is
seen (the rule, its parameters' and saved tensors' shapes but the batch dimension, multiplicity,
dtype, device, backend, thread count) every candidate is timed on that step's tensors, and the
fastest is kept in memory and in a JSON cache (``$DPFAST_CACHE_DIR`` or
``~/.cache/dpfast/plan-v2.json``), keyed by machine as well, so later runs skip the calibration.
Timing only chooses among exact computations: the released gradient is the same function of the data
whatever it picks, up to float rounding (fp32, or fp64 for fp64 layers). The timings are taken on
the private step's own tensors, so in principle they could depend on values (subnormals on a CPU);
what that could move is the choice, and through it the release only at the rounding level. The
batch size enters only through the memory budget, and a Poisson batch's size is released anyway.

Memory: a materialized layer holds ``B x P_layer`` gradients from its backward to the end of the
step. ``max_materialized_bytes`` bounds what the materialized layers hold beyond what they free
(their saved inputs and output gradients); a layer that would pass it takes its ghost or direct
strategy for that step. ``None`` (the default) is 64 MiB; a float in (0, 1) is that fraction of the
memory free when the engine was built (the GPU's for CUDA, the machine's for CPU).
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import platform
import threading
import time
from pathlib import Path

import torch

STRATEGIES = ("ghost", "direct", "materialize")
DEFAULT_EXTRA_BYTES = 64 << 20
_CACHE_VERSION = 2  # 2: materialize entries name the fastest way to form per-sample gradients


def check_norm_method(norm_method) -> None:
    """``"auto"``, a strategy name, or {layer name or glob: "auto" | strategy}."""
    allowed = ("auto", *STRATEGIES)
    if isinstance(norm_method, str):
        if norm_method not in allowed:
            raise ValueError(f"norm_method must be one of {allowed} or a dict of layer name -> one of them, "
                             f"got {norm_method!r}")
        return
    if isinstance(norm_method, dict):
        bad = {k: v for k, v in norm_method.items() if not isinstance(k, str) or v not in allowed}
        if bad:
            raise ValueError(f"norm_method: every key must be a layer name (or glob) and every value one of "
                             f"{allowed}; got {bad}")
        return
    raise ValueError(f"norm_method must be a str or a dict, got {type(norm_method).__name__}")


def resolve_extra_bytes(max_materialized_bytes, device: torch.device | None = None) -> int:
    if max_materialized_bytes is None:
        return DEFAULT_EXTRA_BYTES
    if isinstance(max_materialized_bytes, bool) or not isinstance(max_materialized_bytes, (int, float)):
        raise ValueError(f"max_materialized_bytes must be a number of bytes, a fraction in (0, 1) or None, got "
                         f"{max_materialized_bytes!r}")
    if isinstance(max_materialized_bytes, float) and 0 < max_materialized_bytes < 1:
        return int(max_materialized_bytes * free_memory(device))
    if max_materialized_bytes < 0 or max_materialized_bytes != int(max_materialized_bytes):
        raise ValueError(f"max_materialized_bytes must be >= 0 bytes (an int) or a fraction in (0, 1), got "
                         f"{max_materialized_bytes!r}")
    return int(max_materialized_bytes)


def free_memory(device: torch.device | None) -> int:
    if device is not None and device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return DEFAULT_EXTRA_BYTES


def _machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return f"{platform.machine()}|{platform.processor() or platform.node()}|{gpu}|torch {torch.__version__}"


def _cache_path() -> Path:
    root = os.environ.get("DPFAST_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dpfast")
    return Path(root) / f"plan-v{_CACHE_VERSION}.json"


class Planner:
    """Chooses and remembers each layer shape's strategy; one per process (see :func:`planner`)."""

    def __init__(self, cache_path: Path | None = None):
        self.cache_path = cache_path
        self.machine = _machine()
        self._lock = threading.Lock()
        self.choices: dict[str, dict] = {}  # key -> {"strategy", "times": {strategy: seconds per sample}}
        if cache_path is not None:
            try:
                data = json.loads(cache_path.read_text())
            except (OSError, ValueError):
                data = None
            self.choices = _valid_entries(data, self.machine)

    def lookup(self, key: str) -> dict | None:
        return self.choices.get(key)

    def record(self, key: str, times: dict[str, float], variant: str | None = None) -> dict:
        """Keeps the fastest of ``times``; ``variant`` is the way the rule formed per-sample gradients
        fastest (the one materialize's time is for)."""
        best = min(times, key=times.get)
        entry = {"strategy": best, "times": times}
        if variant is not None:
            entry["variant"] = variant
        with self._lock:
            self.choices[key] = entry
            self._save()
        return entry

    def _save(self) -> None:
        if self.cache_path is None:
            return
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            try:
                data = json.loads(self.cache_path.read_text())
            except (OSError, ValueError):
                data = None
            if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION \
                    or not isinstance(data.get("machines"), dict):
                data = {"version": _CACHE_VERSION, "machines": {}}
            # other machines' entries are kept as they are; this machine's are rewritten, valid ones only
            data["machines"][self.machine] = {**_valid_entries(data, self.machine), **self.choices}
            tmp = self.cache_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.cache_path)
        except OSError:
            pass  # a read-only home: the choices stay in memory for this process


def _valid_entries(data, machine: str) -> dict:
    """The well-formed entries of a cache file for ``machine``; anything else is ignored (a damaged
    cache only costs a new measurement)."""
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        return {}
    machines = data.get("machines")
    mine = machines.get(machine) if isinstance(machines, dict) else None
    if not isinstance(mine, dict):
        return {}
    out = {}
    for key, entry in mine.items():
        if not (isinstance(key, str) and isinstance(entry, dict) and entry.get("strategy") in STRATEGIES):
            continue
        times = entry.get("times")
        if not isinstance(times, dict) or not times or entry["strategy"] not in times:
            continue
        if all(k in STRATEGIES and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
               for k, v in times.items()):
            out[key] = {"strategy": entry["strategy"], "times": {k: float(v) for k, v in times.items()}}
            if isinstance(entry.get("variant"), str):  # checked against the rule's variants where used
                out[key]["variant"] = entry["variant"]
    return out


_PLANNER: Planner | None = None


def planner() -> Planner:
    global _PLANNER
    if _PLANNER is None:
        off = os.environ.get("DPFAST_PLAN_CACHE", "1") == "0"
        _PLANNER = Planner(None if off else _cache_path())
    return _PLANNER


def forced_strategy(norm_method, name: str) -> str:
    """The user's choice for layer ``name``: "auto" or a strategy."""
    if isinstance(norm_method, str):
        return norm_method
    if name in norm_method:
        return norm_method[name]
    for pattern, method in norm_method.items():
        if fnmatch.fnmatchcase(name, pattern):
            return method
    return "auto"


_KEYS: dict = {}  # signature -> shape_key string: the string is built once per layer shape, not per step


def shape_key(site, multiplicity: int, backend: str = "torch") -> str:
    """What the choice depends on: the rule, its parameters' and saved tensors' shapes (without the
    batch dimension), K, dtype, device, backend and threads (never values)."""
    rows = site.rows
    saved = tuple((k, (v.shape[1:] if v.dim() > 0 and v.shape[0] == rows else v.shape, v.dim() > 0 and
                       v.shape[0] == rows, v.dtype, v.device.type) if torch.is_tensor(v) else v)
                  for k, v in sorted(site.saved.items()) if torch.is_tensor(v) or isinstance(v, _SCALARS))
    G = (site.G.shape[1:], site.G.dtype) if site.G is not None else None
    sig = (type(site.rule), multiplicity, torch.get_num_threads(), backend,
           tuple(t.shape for t in site.targets), saved, G)
    try:
        key = _KEYS.get(sig)
    except TypeError:  # a saved tuple holding something unhashable
        return _format_key(site, multiplicity, backend)
    if key is None:
        if len(_KEYS) > 100_000:
            _KEYS.clear()
        key = _KEYS[sig] = _format_key(site, multiplicity, backend)
    return key


_SCALARS = (bool, int, float, str, tuple)


def _format_key(site, multiplicity: int, backend: str) -> str:
    parts = [type(site.rule).__name__, f"K{multiplicity}", f"t{torch.get_num_threads()}", backend,
             "P" + ",".join(str(tuple(t.shape)) for t in site.targets)]
    for k in sorted(site.saved):
        v = site.saved[k]
        if torch.is_tensor(v):
            rows_first = v.dim() > 0 and v.shape[0] == site.rows  # per-row tensors: the batch size is not kept
            parts.append(f"{k}:{tuple(v.shape[1:]) if rows_first else tuple(v.shape)}:"
                         f"{str(v.dtype).replace('torch.', '')}:{v.device.type}")
        elif isinstance(v, _SCALARS):
            parts.append(f"{k}={v}")
    if site.G is not None:
        parts.append(f"G:{tuple(site.G.shape[1:])}:{str(site.G.dtype).replace('torch.', '')}")
    return "|".join(parts)


def timed(fn, device: torch.device):
    """(result, seconds) of ``fn()``; synchronises CUDA around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0
