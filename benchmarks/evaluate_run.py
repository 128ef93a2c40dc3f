"""The utility grid's sampling and evaluation protocol on a finished run that is not a grid cell (a
DP-SAD cell's teacher, a run trained by hand): the same number of samples, sample seed, downstream
classifier and feature network as the grid's cells, written to <grid>/extra/<name>/result.json.

    python -m benchmarks.evaluate_run --grid benchmarks/results/sad-cpu \
        --run benchmarks/results/sad-cpu/cells/dp-sad_eps10_10m/run/teacher --name dp-sad-teacher_eps10_10m
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def evaluate_run(grid: Path, run: Path, name: str, progress: bool = True, log=print, **options) -> dict:
    """options: the grid's Options (sizes, metric_samples, data_dir, ...) if it was not run with the defaults."""
    from benchmarks import utility as U
    from dpfast.diffusion.trainer import atomic_write_json

    grid, run = Path(grid), Path(run)
    report = json.loads((run / "privacy_report.json").read_text())
    if not report.get("complete"):
        raise ValueError(f"{run}: the run is not finished")
    opts = U.Options(out=grid, progress=progress, log=log, **options,
                     command=" ".join(["python -m benchmarks.evaluate_run", *sys.argv[1:]]))
    g = U.Grid([], opts)
    d = grid / "extra" / name
    d.mkdir(parents=True, exist_ok=True)
    link = d / "run"
    if not link.exists():
        link.symlink_to(os.path.relpath(run.resolve(), d))
    started = time.perf_counter()
    evaluation, images, sample_seconds = g._sample_and_evaluate(d, opts.seed + 7)  # the cells' sample seed
    row = g._metrics(evaluation)
    row.update(name=name, run=str(run), epsilon=report.get("epsilon"), delta=report.get("delta"),
               steps=report.get("steps"), noise_multiplier=report.get("noise_multiplier"), samples=len(images),
               sample_seconds=sample_seconds, seconds=round(time.perf_counter() - started, 1),
               device=g.env["device_name"], commit=g.env["commit"], command=opts.command)
    atomic_write_json(row, d / "result.json")
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.evaluate_run", description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", required=True, help="the utility grid's output directory (its protocol and caches)")
    p.add_argument("--run", required=True, help="a finished `dpfast train` run directory")
    p.add_argument("--name", required=True, help="the row's name (its directory under <grid>/extra/)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    row = evaluate_run(Path(args.grid), Path(args.run), args.name, progress=not args.no_progress)
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
