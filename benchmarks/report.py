"""Writers for benchmark rows: ratios to the same-run baseline, CSV, markdown, PNG plots.

Kept apart from the measuring code in ``harness.py`` so each file reads in one sitting.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Dict, List

from .engines import BASELINE

COLUMNS = [
    "model", "params_M", "engine", "batch_size", "multiplicity", "rows", "dtype", "status", "error",
    "note", "step_ms_median", "step_ms_p25", "step_ms_p75", "step_ms_min", "step_ms_max",
    "samples_per_s", "rows_per_s", "throughput_x_nonprivate", "throughput_x_nonprivate_bf16",
    "peak_bytes", "peak_gib",
    "mem_x_nonprivate", "mem_method", "max_batch", "max_batch_capped", "max_batch_note",
    "norm_share", "steps", "warmup", "device_type", "device_name", "host", "torch", "cuda",
    "triton", "dpfast", "opacus", "diffusers", "commit", "timer",
]


def _key(row):
    return row["model"], row["batch_size"], row["multiplicity"], row["dtype"]


def add_ratios(rows: List[dict]) -> List[dict]:
    """Throughput and peak-memory ratios of each row to the non-private row of the same
    model, batch, multiplicity and dtype in the same run (empty when that row failed).
    ``throughput_x_nonprivate_bf16`` compares every row, whatever its dtype, with the bf16
    non-private step: what a non-private user runs, and dpfast's target (ANCHORS.md)."""
    base: Dict[tuple, dict] = {_key(r): r for r in rows if r["engine"] == BASELINE and r["status"] == "ok"}
    for r in rows:
        b = base.get(_key(r))
        b16 = base.get((*_key(r)[:3], "bf16"))
        r["peak_gib"] = round(r["peak_bytes"] / 2 ** 30, 4) if "peak_bytes" in r else ""
        ok = r["status"] == "ok"
        r["throughput_x_nonprivate"] = round(r["samples_per_s"] / b["samples_per_s"], 3) if ok and b else ""
        r["throughput_x_nonprivate_bf16"] = (round(r["samples_per_s"] / b16["samples_per_s"], 3)
                                             if ok and b16 else "")
        r["mem_x_nonprivate"] = (round(r["peak_bytes"] / b["peak_bytes"], 3)
                                 if ok and b and b["peak_bytes"] > 0 else "")
    return rows


def write_csv(rows: List[dict], path: Path) -> None:
    tmp = Path(path).with_suffix(".csv.tmp")  # never leave a half-written CSV behind
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r.get(c, "") for c in COLUMNS})
    tmp.replace(path)


def _mem(nbytes) -> str:
    if nbytes == "" or nbytes is None:
        return "—"
    return f"{nbytes / 2 ** 30:.2f} GiB" if nbytes >= 2 ** 30 else f"{nbytes / 2 ** 20:.1f} MiB"


def _fmt(x, spec: str) -> str:
    return "—" if x in ("", None) else format(x, spec)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_markdown(rows: List[dict], path: Path, env: dict, opts) -> None:
    lines = [
        "# dpfast bench",
        "",
        f"- device: {env['device_name']} ({env['device_type']}); host {env['host']}",
        f"- torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, dpfast {env['dpfast']}, "
        f"opacus {env['opacus']}, diffusers {env['diffusers']}; commit {env['commit']}",
        f"- step time: median of {opts.steps} steps after {opts.warmup} warm-up ({env['timer']}), "
        f"[p25–p75] in brackets; samples/s counts the B logical samples (B*K rows)",
        f"- peak memory: {rows[0]['mem_method'] if rows else 'n/a'}; ratios against "
        f"`{BASELINE}` in this run",
        "",
    ]
    # The column against bf16 non-private appears only when the run has such rows.
    with_bf16 = any(r.get("throughput_x_nonprivate_bf16", "") != "" for r in rows)
    header = ["model", "B", "K", "dtype", "engine", "step ms", "samples/s", "x non-private",
              *(["x non-private bf16"] if with_bf16 else []), "peak mem", "x non-private", "max B",
              "norm share", "status"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if r["status"] == "ok":
            step = f"{r['step_ms_median']:.1f} [{r['step_ms_p25']:.1f}–{r['step_ms_p75']:.1f}]"
            status = "ok" + (f" ({r['note']})" if r.get("note") else "")
        else:
            step, status = "—", f"{r['status']}: {r['error']}"
        max_b = r.get("max_batch", "")
        max_b = (f"≥{max_b}" if r.get("max_batch_capped") else str(max_b)) if max_b != "" else "—"
        share = r.get("norm_share", "")
        share = f"{share:.0%}" if isinstance(share, float) else "n/a"
        lines.append("| " + " | ".join(_cell(c) for c in [
            r["model"], r["batch_size"], r["multiplicity"], r["dtype"], r["engine"], step,
            _fmt(r.get("samples_per_s", ""), ".1f"), _fmt(r.get("throughput_x_nonprivate", ""), ".2f"),
            *([_fmt(r.get("throughput_x_nonprivate_bf16", ""), ".2f")] if with_bf16 else []),
            _mem(r.get("peak_bytes", "")), _fmt(r.get("mem_x_nonprivate", ""), ".2f"), max_b, share,
            status]) + " |")
    Path(path).write_text("\n".join(lines) + "\n")


def write_plots(rows: List[dict], out_dir: Path) -> List[Path]:
    """One PNG per (model, multiplicity, dtype): samples/s and peak memory against batch size,
    one line per engine. Failed rows are left out (they are in the table)."""
    import matplotlib
    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    written = []
    groups = sorted({(r["model"], r["multiplicity"], r["dtype"]) for r in rows}, key=str)
    for model, k, dtype in groups:
        ok = [r for r in rows if (r["model"], r["multiplicity"], r["dtype"]) == (model, k, dtype)
              and r["status"] == "ok"]
        if not ok:
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        unit, scale = ("GiB", 2 ** 30) if max(r["peak_bytes"] for r in ok) >= 2 ** 30 else ("MiB", 2 ** 20)
        for engine in dict.fromkeys(r["engine"] for r in ok):  # run order, baseline first
            pts = sorted((r["batch_size"], r["samples_per_s"], r["peak_bytes"] / scale)
                         for r in ok if r["engine"] == engine)
            bs = [p[0] for p in pts]
            style = dict(marker="o", label=engine, linestyle="--" if engine == BASELINE else "-")
            ax_t.plot(bs, [p[1] for p in pts], **style)
            ax_m.plot(bs, [p[2] for p in pts], **style)
        batch_sizes = sorted({r["batch_size"] for r in ok})
        for ax, ylabel in ((ax_t, "samples / s"), (ax_m, f"peak memory ({unit})")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
            ax.minorticks_off()
            ax.set_xlabel("batch size B (logical samples)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        fig.suptitle(f"{model}, K={k}, {dtype} — {ok[0]['device_name']}", fontsize=10)
        fig.tight_layout()
        path = Path(out_dir) / (re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model}_K{k}_{dtype}") + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
