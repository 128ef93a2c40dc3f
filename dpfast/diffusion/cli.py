"""`dpfast train`, `dpfast pretrain`, `dpfast sample`, `dpfast evaluate`.

    dpfast train --preset demo --out runs/demo                 # CPU, a few minutes, real DP
    dpfast pretrain --out runs/public14                        # public data only, no privacy
    dpfast train --preset demo --init-from runs/public14 --out runs/ft   # private fine-tuning
    dpfast train --preset dpdm-fmnist-eps10 --out runs/eps10 --time-budget 540   # resumable chunks
    dpfast sample --model runs/demo --num 10000 --out runs/demo/samples.npz
    dpfast evaluate --samples runs/demo/samples.npz --out runs/demo/eval.json

Every TrainConfig field is a `train` option (--batch-size, --multiplicity, --target-epsilon, ...);
run `dpfast train --help` for the list. The lead's dpfast/cli.py calls add_commands(subparsers);
`python -m dpfast.diffusion.cli` runs the same commands on their own.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .evaluate import CLASSIFIER_EPOCHS, CLASSIFIER_MAX_STEPS, FEATURE_STEPS, SIZES
from .presets import PRESETS, RECIPES, TrainConfig, get_preset
from .public import SAMPLES_MARK, SOURCES as PUBLIC_SOURCES


# ----------------------------------------------------------------------------- option parsing
def _none_or(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _int_tuple(text: str) -> tuple:
    return tuple(int(t) for t in text.replace(" ", "").split(",") if t)


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, typed from its annotation. An option left out is absent from
    the namespace (argparse.SUPPRESS), so "not given" and "none" stay distinct."""
    group = parser.add_argument_group(
        "configuration (overrides the preset; shown: the value the default preset 'demo' uses)")
    demo = PRESETS["demo"]
    text_choices = {"recipe": "|".join(RECIPES), "syngen": "coarse|cleaning|finetune", "sampler": "ddim|edm", "mode": "bk|two-pass",
                    "backend": "torch|triton|auto", "accountant": "prv|rdp", "augment": "none|flip|crop|flip+crop",
                    "embedding_type": "positional|fourier", "mepf_moments": "mean|mean+second",
                    "sad_teacher": "dp|nonprivate"}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        ann = str(f.type)
        default = getattr(demo, f.name)
        if ann == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS,
                               help=f"(demo: {default})")
            continue
        if ann == "tuple":
            kind, shown = _int_tuple, "ints"
        else:
            base = ann.split("|")[0].strip()
            kind = {"int": int, "float": float, "str": str}[base]
            shown = base
            if "None" in ann:
                kind, shown = _none_or(kind), f"{base} or none"
        choices = f"{text_choices[f.name]}; " if f.name in text_choices else ""
        group.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS,
                           metavar=shown.split()[0].upper(),
                           help=f"({choices}{shown}; demo: {default!r})")


def config_from_args(args) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if hasattr(args, f.name)}
    if args.config:
        cfg = TrainConfig.from_dict(json.loads(Path(args.config).read_text()))
        return cfg.replace(**overrides)
    return get_preset(args.preset, **overrides)


def _set_threads(n: int) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


# ----------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    from .data import DatasetNotFoundError
    from .presets import ConfigError
    from .trainer import train

    try:
        cfg = config_from_args(args).validate()
    except (ValueError, OSError) as e:  # bad options or --config (JSON): said before anything else happens
        print(f"dpfast train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.dumps())
        return 0
    try:
        result = train(cfg, args.out, progress=not args.no_progress)
    except (DatasetNotFoundError, ConfigError) as e:  # missing data, a refused setting, another run in --out
        print(f"dpfast train: {e}", file=sys.stderr)
        return 2
    # a stop by signal exits as the shell would report the signal (128 + its number)
    return {"SIGINT": 130, "SIGTERM": 143}.get(result["reason"], 0)


def cmd_pretrain(args) -> int:
    """`dpfast train` with recipe pretrain: public data only, no privacy, no private data read."""
    if not hasattr(args, "recipe"):
        args.recipe = "pretrain"
    if args.recipe != "pretrain":
        print("dpfast pretrain: --recipe is always pretrain here (use dpfast train for the others)", file=sys.stderr)
        return 2
    return cmd_train(args)


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from .trainer import (atomic_write_bytes, class_names, draw_batches, load_sampler, resolve_device, save_grid,
                          to_uint8)

    _set_threads(args.threads)
    try:
        device = resolve_device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device is available here")
        if args.num < 1 or args.batch_size < 1:
            raise ValueError("--num and --batch-size must be >= 1")
        draw, meta = load_sampler(args.model, device)
    except (OSError, ValueError) as e:
        print(f"dpfast sample: {e}", file=sys.stderr)
        return 2
    k = meta["num_classes"]
    if k == 0:
        labels = None
    elif args.labels == "balanced":
        labels = torch.arange(args.num) % k
    elif args.labels == "random":
        labels = torch.randint(0, k, (args.num,), generator=torch.Generator().manual_seed(args.seed))
    else:
        labels = torch.full((args.num,), int(args.labels), dtype=torch.long)
    extra = {"S_churn": args.churn} if args.sampler == "edm" else {"stochastic": args.stochastic}
    images = draw_batches(draw, args.num, labels, args.seed, batch_size=args.batch_size,
                          progress=not args.no_progress, sampler=args.sampler, num_steps=args.steps,
                          guidance=args.guidance, **extra)
    as_uint8 = to_uint8(images).numpy()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"images": as_uint8, SAMPLES_MARK: np.array(json.dumps({
        "model": str(args.model), "step": meta["step"], "recipe": meta["config"].recipe,
        "private": bool(meta["config"].private)}))}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    atomic_write_bytes(out, lambda f: np.savez_compressed(f, **arrays))
    print(f"wrote {args.num} samples {tuple(as_uint8.shape[1:])} (uint8, N x C x H x W"
          f"{', with labels' if labels is not None else ''}) from step {meta['step']} to {out}")
    if args.grid:
        rows = None
        if labels is None:
            picked = images[:100]
        else:  # one class per row, as the training grids: the first 10 images of each of the first 10 classes
            classes = [c for c in range(min(k, 10)) if (labels == c).any()]
            picked = torch.cat([images[labels == c][:10] for c in classes])
            names = class_names(meta["config"], k)
            rows = [names[c] for c in classes]
            if any((labels == c).sum() < 10 for c in classes):  # rows of unequal length: one image per row start
                picked, rows = images[:100], None
        save_grid(picked, Path(args.grid), nrow=10, row_labels=rows)
        print(f"grid of {len(picked)} samples" + (" (a row per class)" if rows else "") + f": {args.grid}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate
    from .trainer import atomic_write_json

    _set_threads(args.threads)
    samples = Path(args.samples)
    if not samples.is_file():
        print(f"dpfast evaluate: {samples} is not a file (give the .npz written by `dpfast sample`)", file=sys.stderr)
        return 2
    report = evaluate(args.samples, data_dir=args.data_dir, sizes=args.sizes, epochs=args.epochs,
                      max_steps=args.max_steps or None, feature_steps=args.feature_steps,
                      feature_cache=args.feature_cache, accuracy_metric=not args.no_accuracy,
                      fid=not args.no_fid, seed=args.seed, progress=not args.no_progress)
    if args.out:
        atomic_write_json(report, Path(args.out))
        print(f"report: {args.out}")
    else:
        print(json.dumps(report, indent=2))
    return 0


def cmd_syngen_threshold(args) -> int:
    from .syngen import plot_thresholds, stage_mass, thresholds

    try:
        for name in ("sigma_min", "sigma_max", "rho"):
            value = getattr(args, name)
            if not (value > 0 and value < float("inf")):
                raise ValueError(f"--{name.replace('_', '-')} must be > 0; got {value}")
        if not args.sigma_min * 1.01 < args.sigma_max:
            raise ValueError(f"--sigma-min must be below --sigma-max; got {args.sigma_min} >= {args.sigma_max}")
        if not 1 <= args.rho <= 100:
            raise ValueError(f"--rho must be in [1, 100]; got {args.rho}")
        if args.tau is not None and not args.tau > 0:
            raise ValueError(f"--tau must be > 0; got {args.tau}")
    except ValueError as e:
        print(f"dpfast syngen-threshold: {e}", file=sys.stderr)
        return 2
    schedule = dict(sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho)
    th = thresholds(**schedule)
    th["training_share"] = {  # the share of DPDM's training noise levels (ln sigma ~ N(-1.2, 1.2^2)) per stage
        "cleaning": stage_mass(0.0, th["cleaning"]), "context": stage_mass(th["cleaning"], th["coarse"]),
        "coarse": stage_mass(th["coarse"], float("inf"))}
    if args.json:
        print(json.dumps(th, indent=2))
    else:
        print(f"{th['rule']} (sigma in [{args.sigma_min:g}, {args.sigma_max:g}], rho {args.rho:g}):")
        for name in ("cleaning", "coarse"):
            print(f"  tau_{name:<8} sigma = {th[name]:.4g}  (t = {th['t_' + name]:.3f}, alpha_bar = "
                  f"{th['alpha_bar_' + name]:.3f})")
        share = th["training_share"]
        print(f"  training noise levels per stage: cleaning {share['cleaning']:.1%}, context {share['context']:.1%}, "
              f"coarse {share['coarse']:.1%}")
        print("  dpfast train --preset syngen-cleaning uses tau_cleaning, syngen-coarse tau_coarse; --tau overrides")
    if args.plot:
        plot_thresholds(args.plot, tau=args.tau, **schedule)
        print(f"plot: {args.plot}")
    return 0


# ----------------------------------------------------------------------------- registration
def add_commands(subparsers) -> None:
    def training_command(name, preset, func, **text):
        p = subparsers.add_parser(name, **text)
        p.add_argument("--preset", default=preset, choices=sorted(PRESETS))
        p.add_argument("--config", help="a config.json (e.g. from an earlier run) instead of a preset")
        p.add_argument("--out", required=True, help="output directory (checkpoint, model, samples, privacy report)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        _add_config_options(p)
        p.set_defaults(func=func)

    training_command(
        "train", "demo", cmd_train,
        help="train a diffusion model with DP-SGD (resumes when --out holds a checkpoint)",
        description="Train an EDM/DDPM++ diffusion model with DP-SGD. Presets: "
                    + ", ".join(sorted(PRESETS)) + ". Re-running on the same --out resumes (with a fresh noise key).")
    training_command(
        "pretrain", "pretrain-demo14", cmd_pretrain,
        help="pre-train a diffusion model on public data only (no privacy spent, no private data read)",
        description="Non-private training on --public-data (" + ", ".join(sorted(PUBLIC_SOURCES))
                    + ", a+b, or a path). `dpfast train --init-from OUT` then fine-tunes the model privately. "
                      "Re-running on the same --out resumes.")

    p = subparsers.add_parser("sample", help="draw labelled samples from a trained model into a .npz",
                              description="Samples from any recipe's run (a diffusion model, or a DP-MEPF "
                                          "generator: the sampler options apply to diffusion models only).")
    p.add_argument("--model", required=True, help="run directory, model.pt or checkpoint.pt")
    p.add_argument("--num", type=int, default=10000)
    p.add_argument("--out", required=True, help="output .npz (images uint8 N x C x H x W, labels)")
    p.add_argument("--labels", default="balanced", help="balanced | random | a class index")
    p.add_argument("--sampler", choices=("ddim", "edm"), default="ddim")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (ddim 50, edm 18)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale w")
    p.add_argument("--churn", type=float, default=0.0, help="EDM sampler S_churn (0: deterministic)")
    p.add_argument("--stochastic", action="store_true", help="DDIM: stochastic (Euler-Maruyama) steps")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--grid", help="also write a PNG grid of the first 100 samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    p.set_defaults(func=cmd_sample)

    p = subparsers.add_parser(
        "syngen-threshold", help="DP-SynGen's stage thresholds tau (the elbows of alpha-bar over the schedule), with a plot",
        description="The noise levels where the cleaning stage ends and the coarse stage begins, by the elbow "
                    "rule of dpfast.diffusion.syngen, for the sampler's schedule (defaults: dpfast's).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sigma-min", type=float, default=0.002)
    p.add_argument("--sigma-max", type=float, default=80.0)
    p.add_argument("--rho", type=float, default=7.0)
    p.add_argument("--tau", type=float, default=None, help="also mark this threshold (an override) on the plot")
    p.add_argument("--plot", default=None, help="write the plot (PNG) here")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_syngen_threshold)

    p = subparsers.add_parser(
        "evaluate", help="downstream CNN accuracy, and FID / precision / recall in a classifier's feature space",
        description="Downstream accuracy: a CNN trained on n synthetic samples for each n in --sizes "
                    "(model selection on a synthetic validation split), tested once on the real test "
                    "set. FID, precision and recall (Kynkaenniemi et al., k=3): in the feature space of a "
                    "CNN trained on the real training set (built once, then cached), against the real "
                    "test set; this is NOT Inception FID. That CNN is trained without DP on the private "
                    "training set, so FID, precision and recall are private statistics, not covered by "
                    "epsilon.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--samples", required=True, help=".npz from `dpfast sample`")
    p.add_argument("--data-dir", default=None, help="real data (default: Fashion-MNIST from Debian)")
    p.add_argument("--sizes", type=_int_tuple, default=SIZES,
                   help="downstream training-set sizes (those above the sample count become all samples)")
    p.add_argument("--epochs", type=int, default=CLASSIFIER_EPOCHS, help="epochs of the downstream CNN")
    p.add_argument("--max-steps", type=int, default=CLASSIFIER_MAX_STEPS,
                   help="... and at most this many optimiser steps (0: no cap)")
    p.add_argument("--feature-steps", type=int, default=FEATURE_STEPS,
                   help="training steps of the feature CNN (built once per data set, then cached)")
    p.add_argument("--feature-cache", default=None, help="the feature CNN's cache file "
                   "(default: ~/.cache/dpfast/feature_cnn_<data and code hash>.pt)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--no-fid", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the report JSON here (default: print it)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    p.set_defaults(func=cmd_evaluate)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpfast.diffusion.cli")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
