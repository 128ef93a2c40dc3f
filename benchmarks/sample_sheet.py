"""Side-by-side samples of a utility grid's cells: the first 100 of each cell's samples.npz (the grid
draws balanced labels, so 10 rows of one class each), one panel per cell, titled with its row.

    python -m benchmarks.sample_sheet --grid benchmarks/results/syngen-cpu \
        --cells dpdm_eps1_10m,syngen-cleaning_eps1_10m --out benchmarks/results/syngen-cpu/samples.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def sheet(grid: Path, cells: list[str], out: Path, per_class: int = 10) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = []
    for name in cells:
        d = grid / "cells" / name
        if not (d / "samples.npz").exists() or not (d / "result.json").exists():
            raise FileNotFoundError(f"{d}: no finished cell (samples.npz and result.json)")
        with np.load(d / "samples.npz") as f:
            images, labels = f["images"], f["labels"] if "labels" in f else None
        if labels is None:
            picked = images[:per_class * per_class]
        else:   # per_class images of each of the first per_class classes, one row per class
            picked = np.concatenate([images[labels == k][:per_class] for k in range(min(per_class, labels.max() + 1))])
        n, c, h, w = picked.shape
        rows = n // per_class
        tile = picked[:rows * per_class].reshape(rows, per_class, c, h, w).transpose(0, 3, 1, 4, 2)
        tile = tile.reshape(rows * h, per_class * w, c)
        row = json.loads((d / "result.json").read_text())
        sizes = [int(k[4:]) for k in row if k.startswith("acc_") and k[4:].isdigit() and row[k] is not None]
        acc = f"acc@{max(sizes):,} {row[f'acc_{max(sizes)}']:.3f}" if sizes else "acc —"
        fid = f"FID {row['fid']:.1f}" if row.get("fid") is not None else "FID —"
        title = f"{row['recipe']}, eps={row['epsilon_target']:g}\n{acc}, {fid}"
        panels.append((tile, title))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0))
    for ax, (tile, title) in zip(np.atleast_1d(axes), panels):
        ax.imshow(tile.squeeze(-1) if tile.shape[-1] == 1 else tile, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sample_sheet", description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", required=True, help="a `dpfast bench --utility` --out directory")
    p.add_argument("--cells", required=True, help="comma list of cell names (cells/<name>)")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    try:
        path = sheet(Path(args.grid), [c.strip() for c in args.cells.split(",") if c.strip()], Path(args.out))
    except FileNotFoundError as e:
        print(f"sample_sheet: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
