"""Finalize throughput: Philox + Box-Muller (default) vs ChaCha20 + exact discrete Gaussian (secure).

    python -m benchmarks.finalize_noise --threads 2 --sizes 1000000,10000000 --rounds 5
    python -m benchmarks.finalize_noise --device cuda            # on a GPU (CUDA events)

One fused finalize over one fp32 tensor of n elements (the clipped sum of n parameters), in place,
for each implementation, interleaved round by round so that every ratio is measured side by side
in one run (shared/DESIGN.md). Rows: elements/s, median ms [p25-p75], and the ratio to the Philox
row of the same device and size. The pure Python references run on ``--ref-size`` elements (the
secure one draws about 10^4 elements/s), reported in elements/s like the others.
OMP_NUM_THREADS is fixed by ``--threads`` before torch and dpfast._C are loaded. Writes
``finalize_noise.csv`` and ``finalize_noise.md`` into ``--out`` (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

COLUMNS = ["device_type", "impl", "generator", "n", "threads", "rounds", "ms_median", "ms_p25",
           "ms_p75", "elements_per_s", "x_philox_ext", "note", "device_name", "host", "torch",
           "cuda", "dpfast", "commit", "timer"]


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="OMP_NUM_THREADS and torch threads (default: all cores)")
    p.add_argument("--sizes", default="1000000,10000000", help="comma-separated element counts")
    p.add_argument("--ref-size", type=int, default=5000,
                   help="elements for the pure Python references (0 skips them)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before the OpenMP runtime starts
    import torch

    from dpfast import finalize as F
    from dpfast._ext import ext, has_cuda_ext

    from .harness import environment, resolve_device, time_steps

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if ext is None or (device.type == "cuda" and not has_cuda_ext()):
        raise SystemExit(f"dpfast._C (with {device.type} kernels) is needed for this benchmark")
    env = environment(device)
    key = bytes(range(32))
    kw = dict(noise_std=1.1, scale=1.0 / 256, seed=1234, step=7)
    gens = {"philox": {}, "chacha20": dict(generator="chacha20", key=key)}

    cases = []  # (impl, generator, n, fn)
    for n in [int(s) for s in args.sizes.split(",") if s]:
        acc = torch.randn(n, device=device)
        for gen, extra in gens.items():
            cases.append(("ext", gen, n, lambda a=acc, e=extra: F.finalize_([a], [a], **kw, **e)))
    if args.ref_size > 0:
        acc = torch.randn(args.ref_size)
        for gen, extra in gens.items():
            cases.append(("ref", gen, args.ref_size,
                          lambda a=acc, e=extra: F.finalize_ref([a], [a], **kw, **e)))

    for _, _, _, fn in cases:  # warm-up: thread pools, page faults, CUDA context
        fn()
    times = {i: [] for i in range(len(cases))}
    for _ in range(args.rounds):
        for i, (_, _, _, fn) in enumerate(cases):
            times[i] += time_steps(fn, 1, device)

    rows = []
    for i, (impl, gen, n, _) in enumerate(cases):
        t = sorted(times[i])
        q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
        med = statistics.median(t)
        rows.append({**env, "impl": impl, "generator": gen, "n": n, "threads": args.threads,
                     "rounds": args.rounds, "ms_median": round(med, 3), "ms_p25": round(q[0], 3),
                     "ms_p75": round(q[2], 3), "elements_per_s": n / (med / 1e3), "note": ""})
    for r in rows:
        base = [b for b in rows if b["impl"] == "ext" and b["generator"] == "philox"
                and b["n"] == r["n"]] or [b for b in rows if b["impl"] == "ext"
                                          and b["generator"] == "philox"]
        r["x_philox_ext"] = r["elements_per_s"] / base[-1]["elements_per_s"] if base else ""
        if r["impl"] == "ref" and r["n"] not in [b["n"] for b in rows if b["impl"] == "ext"]:
            r["note"] = f"ratio to the ext Philox row at n={base[-1]['n']}"
    _write(rows, args, env)
    return 0


def _write(rows, args, env) -> None:
    import csv

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "finalize_noise.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [
        "# finalize throughput: Philox vs ChaCha20-secure",
        "",
        f"- device: {env['device_name']} ({env['device_type']}); host {env['host']}; "
        f"OMP_NUM_THREADS={args.threads}",
        f"- torch {env['torch']}, dpfast {env['dpfast']}; commit {env['commit']}; timer {env['timer']}",
        f"- one in-place finalize of n fp32 elements; median of {args.rounds} interleaved rounds "
        "[p25-p75]; ratios against the compiled Philox row of the same n, same run",
        "",
        "| impl | generator | n | ms | elements/s | x Philox (ext) | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['generator']} | {r['n']:,} | {r['ms_median']:.1f} "
                     f"[{r['ms_p25']:.1f}-{r['ms_p75']:.1f}] | {r['elements_per_s']:.3g} | "
                     f"{r['x_philox_ext']:.3g} | {r['note']} |")
    (args.out / "finalize_noise.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
