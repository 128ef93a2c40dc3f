"""The one benchmark harness: timing, peak memory, batch-size search, environment metadata and the
run loop over engines x models x batch sizes x multiplicity x precision.

Measurement rules (shared/DESIGN.md, "How we measure speed"):
- step time: ``warmup`` untimed steps, then ``steps`` timed ones; median and spread. On a GPU each
  step is bracketed by CUDA events (no host sync inside the timed region); on CPU, perf_counter.
- peak memory of the step, minus what was allocated before the model was built. GPU:
  ``torch.cuda.max_memory_allocated`` (reset after setup, so it covers warm-up, where Adam allocates
  its state, and the timed steps). CPU: the process' peak RSS (VmHWM, reset through
  /proc/self/clear_refs) minus the RSS before the model was built; the method is named in every row.
- every ratio is against the non-private row of the same run, model, batch, multiplicity, dtype.
"""
from __future__ import annotations

import ctypes
import gc
import importlib.metadata
import platform
import re
import socket
import statistics
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import torch

from . import engines as E
from .models import DiffusionBatch, ModelUnavailable, count_params, get_model_spec

REPO_ROOT = Path(__file__).resolve().parent.parent
GiB = 2 ** 30


# --------------------------------------------------------------------------------------------
# Environment metadata: carried by every row
# --------------------------------------------------------------------------------------------

def _version(dist: str) -> str:
    # Package metadata, not an import: importing diffusers just to read its version takes seconds.
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "n/a"


def _dpfast_version() -> str:
    # The imported package, not its metadata: a source checkout may differ from what is installed.
    try:
        import dpfast
        return str(getattr(dpfast, "__version__", "unknown"))
    except Exception:  # noqa: BLE001 - a broken dpfast is reported in its rows, not here
        return "n/a"


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "no-commit") + ("+dirty" if dirty else "")


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    return {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "device_type": device.type,
        "host": socket.gethostname(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "n/a",
        "triton": _version("triton"),
        "dpfast": _dpfast_version(),
        "opacus": _version("opacus"),
        "diffusers": _version("diffusers"),
        "commit": _git_commit(),
        "timer": "cuda_events" if device.type == "cuda" else "perf_counter",
    }


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA GPU is visible")
    return device


# --------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], steps: int, device: torch.device) -> List[float]:
    """Milliseconds of each of ``steps`` calls. On a GPU, CUDA events around each step and a single
    sync at the end: the timer adds no host sync of its own, and a step's time is GPU time from its
    first launch to its last kernel (including any gap where the GPU waits for the host)."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_callable(fn: Callable[[], None], device: torch.device, warmup: int = 3, steps: int = 10) -> float:
    """Median milliseconds of ``fn``; the helper the kernel microbenchmarks share with the harness."""
    for _ in range(warmup):
        fn()
    _sync(device)
    return statistics.median(time_steps(fn, steps, device))


def _read_status_kib(key: str) -> Optional[int]:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        # glibc keeps freed blocks mapped; without trimming, the next row's baseline RSS would
        # include the previous row's garbage and hide its growth.
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class PeakMemory:
    """Peak bytes of a region, relative to a baseline taken before the model is built."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.method = "cuda_max_memory_allocated"
        elif self._can_reset_rss():
            self.method = "cpu_rss_peak_delta"
        else:
            # Without a resettable high-water mark the peak is the whole process': an upper bound.
            self.method = "cpu_maxrss_delta_unreset"

    @staticmethod
    def _can_reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _read_status_kib("VmHWM") is not None
        except OSError:
            return False

    def _current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return (_read_status_kib("VmRSS") or 0) * 1024

    def baseline(self) -> None:
        _release_memory(self.device)
        self.base = self._current()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method == "cpu_rss_peak_delta":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            top = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "cpu_rss_peak_delta":
            top = (_read_status_kib("VmHWM") or 0) * 1024
        else:
            import resource
            top = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, top - self.base)


# --------------------------------------------------------------------------------------------
# One measurement
# --------------------------------------------------------------------------------------------

@dataclass
class Options:
    steps: int = 10
    warmup: int = 3
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    lr: float = 1e-4
    seed: int = 0
    search_max_batch: int = 0  # 0: no max-batch search
    search_mem_limit_gib: Optional[float] = None  # CPU search needs a budget: OOM there kills the process
    profile_norms: bool = True
    error_log: Optional[Path] = None


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure(engine_name: str, model_name: str, batch_size: int, multiplicity: int, dtype: str,
            opts: Options, steps: Optional[int] = None, warmup: Optional[int] = None) -> dict:
    """Builds a fresh model, optimizer and engine, runs ``warmup + steps`` steps, and returns the
    measured fields of a row. Never raises for an engine failure: it becomes ``status``/``error``."""
    steps = opts.steps if steps is None else steps
    warmup = opts.warmup if warmup is None else warmup
    device = opts.device
    mem = PeakMemory(device)
    row = {"engine": engine_name, "model": model_name, "batch_size": batch_size,
           "multiplicity": multiplicity, "rows": batch_size * multiplicity, "dtype": dtype,
           "steps": steps, "warmup": warmup, "mem_method": mem.method, "status": "ok", "error": ""}
    model = optimizer = batch = adapter = None
    try:
        mem.baseline()
        spec = get_model_spec(model_name)
        torch.manual_seed(opts.seed)  # the same initial weights for every engine
        model = spec.build().to(device)
        row["params_M"] = round(count_params(model) / 1e6, 3)
        optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr)
        batch = DiffusionBatch(spec.input_shape, batch_size, multiplicity, device, seed=opts.seed)
        adapter = E.make_engine(engine_name)
        adapter.setup(model, optimizer, batch, dtype, multiplicity)
        mem.reset_peak()
        for _ in range(warmup):
            adapter.step()
        _sync(device)
        times = time_steps(adapter.step, steps, device)
        row["peak_bytes"] = mem.peak()
        row.update(_time_stats(times, batch_size, multiplicity))
        row["note"] = adapter.note
        if opts.profile_norms and adapter.computes_norms:
            share = adapter.norm_share()
            if share is None:
                share = profile_norm_share(adapter.step, device, row["step_ms_median"])
            row["norm_share"] = "" if share is None else round(share, 4)
    except (E.EngineUnavailable, ModelUnavailable) as e:
        row.update(status="unavailable", error=str(e))
    except Exception as e:  # noqa: BLE001 - any failure of the engine is a result, not a crash
        row.update(status="oom" if _is_oom(e) else "error", error=_one_line(e))
        if opts.error_log is not None:
            with open(opts.error_log, "a") as f:
                f.write(f"== {engine_name} {model_name} B={batch_size} K={multiplicity} {dtype}\n")
                f.write("".join(traceback.format_exception(e)) + "\n")
    finally:
        if adapter is not None:
            row.setdefault("note", getattr(adapter, "note", ""))
            adapter.teardown()
        # Drop this frame's references (the exception's traceback is gone by now) so the
        # model, its gradients and the optimizer state are freed before the next row.
        model = optimizer = batch = adapter = None
        _release_memory(device)
    return row


# Per-sample norm work, by name: the Triton kernels of kernels/ (on a GPU), and any
# torch.profiler.record_function("dpfast::norm...") range an engine opens around its norm code.
_NORM_NAMES = re.compile(r"direct_norm|ghost_norm|dpfast::norm")


def profile_norm_share(step: Callable[[], None], device: torch.device, step_ms: float) -> Optional[float]:
    """Fraction of a step spent computing per-sample norms, from one profiled step (after timing,
    so profiler overhead never reaches the timed steps). None when no norm work is visible by name.
    GPU: self device time of matching kernels; CPU: time of matching record_function ranges."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    norm_us = sum((e.self_device_time_total if cuda else e.cpu_time_total)
                  for e in prof.key_averages() if _NORM_NAMES.search(e.key))
    return norm_us / 1e3 / step_ms if norm_us > 0 else None


def _one_line(e: BaseException, limit: int = 300) -> str:
    msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return msg[:limit]


def _time_stats(times_ms: List[float], batch_size: int, multiplicity: int) -> dict:
    # "inclusive": quartiles stay within the observed times even for a handful of steps
    q = statistics.quantiles(times_ms, n=4, method="inclusive") if len(times_ms) >= 2 else [times_ms[0]] * 3
    median = statistics.median(times_ms)
    return {"step_ms_median": round(median, 4), "step_ms_p25": round(q[0], 4),
            "step_ms_p75": round(q[2], 4), "step_ms_min": round(min(times_ms), 4),
            "step_ms_max": round(max(times_ms), 4),
            "samples_per_s": round(batch_size / median * 1e3, 2),
            "rows_per_s": round(batch_size * multiplicity / median * 1e3, 2)}


# --------------------------------------------------------------------------------------------
# Largest physical batch that fits
# --------------------------------------------------------------------------------------------

def search_max_batch(engine_name: str, model_name: str, multiplicity: int, dtype: str,
                     opts: Options, start: int = 1, on_probe: Callable[[int], None] = lambda b: None):
    """Largest logical batch B (B*K rows) for which one step runs, to within 1/16 of B.
    Doubling from ``start`` until a failure or ``opts.search_max_batch``, then bisection.
    A step "fits" when it does not run out of memory and, if a limit is set, its peak stays under it.
    Returns ``(max_batch, capped, note)``; ``capped`` means the search hit its upper bound."""
    device = opts.device
    limit = opts.search_mem_limit_gib
    if device.type != "cuda" and limit is None:
        return None, False, "search on CPU needs --search-mem-limit"

    def fits(b: int) -> Optional[bool]:
        on_probe(b)
        row = measure(engine_name, model_name, b, multiplicity, dtype, opts, steps=1, warmup=1)
        if row["status"] == "ok":
            return limit is None or row["peak_bytes"] <= limit * GiB
        return False if row["status"] == "oom" else None  # None: fails for another reason

    lo, hi = 0, None
    b = max(1, start)
    while b <= opts.search_max_batch:
        ok = fits(b)
        if ok is None:
            return None, False, "search stopped: the engine fails for a reason other than memory"
        if not ok:
            hi = b
            break
        lo, b = b, b * 2
    if hi is None:
        if lo < opts.search_max_batch and fits(opts.search_max_batch):
            lo = opts.search_max_batch
        return lo, True, f">= {lo} (search cap)"
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return (lo or None), False, "" if lo else "batch 1 does not fit"


# --------------------------------------------------------------------------------------------
# The run loop
# --------------------------------------------------------------------------------------------

@dataclass
class Sweep:
    engines: List[str]
    models: List[str]
    batch_sizes: List[int]
    multiplicities: List[int] = field(default_factory=lambda: [1])
    dtypes: List[str] = field(default_factory=lambda: ["fp32"])


def run(sweeps: Union[Sweep, Sequence[Sweep]], opts: Options, out_dir: Path, progress: bool = True,
        plots: bool = True) -> List[dict]:
    """Measures every configuration of ``sweeps``, then (if asked) searches the largest batch per
    engine/model/K/dtype, and writes ``results.csv``, ``results.md`` and PNG plots into ``out_dir``.
    The CSV is rewritten after every row, so an interrupted run keeps what it measured."""
    from tqdm import tqdm
    from . import report

    sweeps = [sweeps] if isinstance(sweeps, Sweep) else list(sweeps)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    opts.error_log = out_dir / "errors.log"
    env = environment(opts.device)
    # (model, dtype, K, batch sizes, engines); the baseline first, so its row exists for ratios
    groups = [(m, d, k, s.batch_sizes, [E.BASELINE] + [e for e in s.engines if e != E.BASELINE])
              for s in sweeps for m in s.models for d in s.dtypes for k in s.multiplicities]
    searching = opts.search_max_batch > 0
    total = sum(len(g[4]) * (len(g[3]) + int(searching)) for g in groups)
    rows: List[dict] = []
    csv_path = out_dir / "results.csv"
    if groups:
        # One untimed throwaway step per engine first. The first use of an engine in a process
        # pays one-time costs (CUDA context, cuBLAS/cuDNN handles, lazy imports and extension
        # loading, thread pools) that would otherwise land on its first row: in the baseline's
        # case they would skew every ratio, and on CPU they would show up as peak RSS.
        model, dtype, k, batch_sizes, _ = groups[0]
        for engine in dict.fromkeys(e for g in groups for e in g[4]):
            measure(engine, model, min(batch_sizes), k, dtype, opts, steps=1, warmup=0)
    with tqdm(total=total, desc="dpfast bench", unit="run", disable=not progress, dynamic_ncols=True) as bar:
        for model, dtype, k, batch_sizes, engines in groups:
            for b in batch_sizes:
                for engine in engines:
                    bar.set_postfix_str(f"{model} {engine} B={b} K={k} {dtype}")
                    row = measure(engine, model, b, k, dtype, opts)
                    rows.append({**row, **env})
                    report.write_csv(report.add_ratios(rows), csv_path)
                    bar.update()
            if not searching:
                continue
            for engine in engines:
                mine = [r for r in rows if (r["engine"], r["model"], r["dtype"], r["multiplicity"])
                        == (engine, model, dtype, k)]
                fitted = [r["batch_size"] for r in mine if r["status"] == "ok"]
                if fitted or any(r["status"] == "oom" for r in mine):
                    probe = lambda b: bar.set_postfix_str(f"{model} {engine} K={k} {dtype} search B={b}")
                    best, capped, note = search_max_batch(engine, model, k, dtype, opts,
                                                          start=max(fitted, default=1), on_probe=probe)
                else:  # unavailable or broken: probing would only repeat the error
                    best, capped, note = None, False, "not searched: no batch size ran"
                for r in mine:
                    r.update(max_batch=best if best is not None else "", max_batch_capped=capped,
                             max_batch_note=note)
                bar.update()
    rows = report.add_ratios(rows)
    report.write_csv(rows, csv_path)
    report.write_markdown(rows, out_dir / "results.md", env, opts)
    if plots:
        report.write_plots(rows, out_dir)
    return rows
