"""Trainable parameters and DP-SGD step time of the fine-tuning recipes against full fine-tuning,
measured side by side in one process (same thread count, interleaved rounds, median per preset), on
random images of Fashion-MNIST's shape and number (step time does not depend on pixel values).

    OMP_NUM_THREADS=1 python -m benchmarks.finetune_cost --out benchmarks/results/finetune-cost.json

Frozen parameters cost the engine nothing: no per-sample norm, no clipped sum, no noise. The step
time still includes the full forward and the backward through the frozen layers (needed for the
gradients of the trainable ones below them).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

PRESETS = ("demo", "demo-pretrained", "dp-diffusion-demo", "dp-lora-demo", "dp-ldm-demo")
REFERENCE = "demo-pretrained"   # full fine-tuning, K=1: the baseline of the ratios


def main(argv=None) -> int:
    from benchmarks.utility import _random_like, pilot_seconds_per_step
    from dpfast.diffusion.data import ImageDataset
    from dpfast.diffusion.finetune import select_trainable
    from dpfast.diffusion.presets import PRESETS as ALL
    from dpfast.diffusion.trainer import build_denoiser

    p = argparse.ArgumentParser(prog="python -m benchmarks.finetune_cost")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    shape = {"images": torch.zeros((60000, 1, 14, 14), dtype=torch.uint8)}
    data = _random_like(ImageDataset(shape["images"], torch.zeros(60000, dtype=torch.long), 10, "shape"))
    times = {name: [] for name in PRESETS}
    for r in range(args.rounds):
        for name in PRESETS:
            cfg = ALL[name].replace(init_from=None)   # timing only: the weights do not matter
            times[name].append(pilot_seconds_per_step(cfg, data))
            print(f"round {r + 1}/{args.rounds} {name}: {times[name][-1]:.3f} s/step", file=sys.stderr)
    rows = []
    ref = statistics.median(times[REFERENCE])
    for name in PRESETS:
        cfg = ALL[name]
        shape_ = (cfg.ldm_latent_channels, 7, 7) if cfg.recipe == "dp-ldm" else (1, 14, 14)
        model = build_denoiser(cfg, shape_, 10)
        trainable = select_trainable(model, cfg.trainable)
        n_train = sum(p.numel() for n, p in model.named_parameters() if n in set(trainable))
        s = statistics.median(times[name])
        rows.append({"preset": name, "recipe": cfg.recipe, "trainable": cfg.trainable,
                     "multiplicity": cfg.multiplicity, "parameters": sum(p.numel() for p in model.parameters()),
                     "trainable_parameters": n_train, "seconds_per_step": round(s, 4),
                     "x_full_fine_tuning": round(s / ref, 3), "all_seconds": [round(t, 4) for t in times[name]]})
    text = json.dumps({"threads": 1, "rounds": args.rounds, "reference": REFERENCE, "rows": rows}, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
