"""How tight dpfast's white-box one-run audit is: the epsilon lower bound (confidence 0.95) beside the
accountant's claim at eps = 1, 4, 10, for a few sampling set-ups, 3 seeds each, in CPU seconds.

    python -m benchmarks.audit_tightness --out benchmarks/results/audit
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from dpfast.audit import audit_engine

SETUPS = [  # (steps, sample rate)
    (1, 1.0),
    (10, 0.5),
    (100, 0.1),
]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/audit")
    ap.add_argument("--canaries", type=int, default=50000)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for eps in (1.0, 4.0, 10.0):
        for steps, q in SETUPS:
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                r = audit_engine(target_epsilon=eps, steps=steps, sample_rate=q, canaries=args.canaries, seed=seed)
                rows.append({"epsilon_claimed": round(r.epsilon_claimed, 4), "steps": steps, "sample_rate": q,
                             "sigma": round(r.noise_multiplier, 4), "seed": seed, "canaries": r.canaries,
                             "guesses": r.guesses, "correct": r.correct,
                             "epsilon_lower": round(r.epsilon_lower, 4), "violated": r.violated,
                             "cpu_s": round(time.perf_counter() - t0, 2)})
                print(rows[-1], flush=True)
    with open(out / "tightness.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| claimed eps | steps | q | sigma | lower bound (min / mean / max over seeds) | ratio | CPU s per audit |",
             "|---|---|---|---|---|---|---|"]
    for eps in (1.0, 4.0, 10.0):
        for steps, q in SETUPS:
            sel = [r for r in rows if abs(r["epsilon_claimed"] - eps) < 0.05 * eps and r["steps"] == steps]
            lb = [r["epsilon_lower"] for r in sel]
            mean = sum(lb) / len(lb)
            lines.append(f"| {sel[0]['epsilon_claimed']:.3f} | {steps} | {q} | {sel[0]['sigma']:.3f} | "
                         f"{min(lb):.3f} / {mean:.3f} / {max(lb):.3f} | {mean / eps:.2f} | "
                         f"{sum(r['cpu_s'] for r in sel) / len(sel):.1f} |")
    (out / "tightness.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
