"""Command line: ``dpfast bench ...`` (registered by ``add_commands``) and ``python -m benchmarks ...``."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import engines as E
from .models import MODELS

# Named sweeps. A preset's per-model batch sizes follow ANCHORS.md; explicit options override it.
PRESETS = {
    "ci": dict(sweeps=[("tiny", [2])], engines="all", dtypes=["fp32"], multiplicities=[1],
               steps=2, warmup=1),
    "anchors": dict(sweeps=[("ddpm", [64, 256]), ("small", [256, 1024])], engines="all",
                    dtypes=["fp32", "bf16"], multiplicities=[1], steps=10, warmup=3),
    "dpdm": dict(sweeps=[("dpdm28", [64, 256]), ("dpdm32", [64, 256])], engines="all",
                 dtypes=["fp32", "bf16"], multiplicities=[1, 4, 16], steps=10, warmup=3),
}

DESCRIPTION = """\
Benchmark DP engines side by side on diffusion models: step time, samples/s and peak memory,
each as a ratio to non-private training measured in the same run, plus the largest batch that
fits and the share of the step spent in per-sample norms. Writes results.csv, results.md and
PNG plots to --out. A failing or missing engine becomes a row with its error.

engines: {engines}
models:  {models}, or pkg.module:factory""".format(engines=", ".join(E.ENGINES), models=", ".join(MODELS))

EPILOG = """\
examples:
  dpfast bench --preset ci                                   # seconds, on CPU
  dpfast bench --preset anchors --out runs/anchors-h100      # the ANCHORS.md table, GPU
  dpfast bench --engines 'non-private,dpfast-bk-*,opacus-hooks' --models ddpm \\
               --batch-sizes 64,256 --dtype fp32,bf16 --search-max-batch 4096
  dpfast bench --models mypkg.nets:make_unet --batch-sizes 32 --multiplicity 1,8
  dpfast bench --utility --epsilons 1,10 --budget 10m        # the utility table (README), CPU
  dpfast bench --utility --scale paper --budget 8h           # the paper-scale table, GPU"""


def _ints(s: str):
    return [int(x) for x in s.split(",") if x.strip()]


def _strs(s: str):
    return [x.strip() for x in s.split(",") if x.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named sweep; options below override it")
    p.add_argument("--engines", help="comma list or globs, or 'all' (default: all). "
                   "non-private is always run: it is the baseline of every ratio")
    p.add_argument("--models", type=_strs, help="comma list (default: small)")
    p.add_argument("--batch-sizes", type=_ints, help="logical batch sizes B (default: 16,64)")
    p.add_argument("--multiplicity", type=_ints, help="K values; a step holds B*K rows (default: 1)")
    p.add_argument("--dtype", type=_strs, help="fp32 and/or bf16 (autocast) (default: fp32)")
    p.add_argument("--steps", type=int, help="timed steps per row (default: 10)")
    p.add_argument("--warmup", type=int, help="untimed steps before timing (default: 3)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<time>-<device>)")
    p.add_argument("--search-max-batch", type=int, default=0, metavar="N",
                   help="also search the largest batch that fits, up to N (default: off)")
    p.add_argument("--search-mem-limit", type=float, metavar="GIB",
                   help="memory budget for the search; required on CPU, optional on GPU")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default: 1e-4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-norm-share", action="store_true",
                   help="skip the profiled step that measures the norm share of dpfast rows")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--fail-on-error", action="store_true",
                   help="exit 1 if any row failed (error or oom; 'unavailable' does not count)")
    p.add_argument("--list", action="store_true", help="list engines and models, then exit")
    p.add_argument("--utility", action="store_true",
                   help="the utility benchmark instead: recipes x epsilon x budget, each trained, sampled "
                        "and evaluated, beside baselines (options below; resumable)")
    from . import utility

    utility.add_arguments(p)


def add_commands(subparsers) -> argparse.ArgumentParser:
    """Registers ``bench`` on an argparse subparsers object; the handler is ``args.func(args)``."""
    p = subparsers.add_parser("bench", help="benchmark DP engines on diffusion models",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run_from_args)
    return p


def _list() -> int:
    import importlib.util

    import torch

    def missing(name):
        needs = [m for m in ("dpfast", "opacus") if m in name]
        needs += ["triton"] if "triton" in name else []
        why = [f"{m} not installed" for m in needs if importlib.util.find_spec(m) is None]
        if "triton" in name and not torch.cuda.is_available():
            why.append("needs a CUDA GPU")
        return f"  (unavailable here: {', '.join(why)})" if why else ""

    print("engines:")
    for name in E.ENGINES:
        print(f"  {name}{missing(name)}")
    print("models:")
    for spec in MODELS.values():
        print(f"  {spec.name:10s} {'x'.join(map(str, spec.input_shape)):9s} {spec.description}")
    print("  pkg.module:factory  a user model (see benchmarks/models.py)")
    return 0


def run_from_args(args: argparse.Namespace) -> int:
    from . import harness

    if args.list:
        return _list()
    if args.utility:
        from . import utility

        return utility.run_from_args(args)
    preset = PRESETS.get(args.preset, {})

    def pick(value, key, default):
        return value if value is not None else preset.get(key, default)

    try:
        engines = E.resolve_engines(pick(args.engines, "engines", "all"))
    except ValueError as e:
        raise SystemExit(str(e))
    dtypes = pick(args.dtype, "dtypes", ["fp32"])
    bad = [d for d in dtypes if d not in E.DTYPES]
    if bad:
        raise SystemExit(f"unknown dtype {bad}; choose from {', '.join(E.DTYPES)}")
    multiplicities = pick(args.multiplicity, "multiplicities", [1])
    if args.models:
        sweeps = [(m, args.batch_sizes or [16, 64]) for m in args.models]
    elif preset:
        sweeps = [(m, args.batch_sizes or b) for m, b in preset["sweeps"]]
    else:
        sweeps = [("small", args.batch_sizes or [16, 64])]

    device = harness.resolve_device(args.device)
    opts = harness.Options(steps=pick(args.steps, "steps", 10), warmup=pick(args.warmup, "warmup", 3),
                           device=device, lr=args.lr, seed=args.seed,
                           search_max_batch=args.search_max_batch,
                           search_mem_limit_gib=args.search_mem_limit,
                           profile_norms=not args.no_norm_share)
    out = args.out or (harness.REPO_ROOT / "benchmarks" / "results"
                       / f"{time.strftime('%Y%m%d-%H%M%S')}-{device.type}")
    sweeps = [harness.Sweep(engines=engines, models=[m], batch_sizes=b, multiplicities=multiplicities,
                            dtypes=dtypes) for m, b in sweeps]
    rows = harness.run(sweeps, opts, out, progress=not args.no_progress, plots=not args.no_plots)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.csv, results.md" + ("" if args.no_plots else " and PNG plots"),
          file=sys.stderr)
    failed = [r for r in rows if r["status"] in ("error", "oom")]
    return 1 if failed and args.fail_on_error else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=DESCRIPTION,
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
