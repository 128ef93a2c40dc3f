"""diffusers' unconditional training loop (UNet2DModel, DDPMScheduler, EMAModel, an LR scheduler,
accelerate's save_state / load_state, save_pretrained) made private with dpfast, with noise
multiplicity K (DPDM's: each image is used K times per step, each with its own noise and timestep,
and its K rows are clipped together as one sample).

What changes from the non-private script, and why:
- `engine.make_private(...)` on the model, optimizer and loader, before `accelerator.prepare` (which
  gets the model, optimizer and scheduler, never the private loader: its Poisson batches are dpfast's).
- `--train-batch-size` is the expected number of *samples* per logical step; the model sees K times
  as many rows (`dpfast.expand_rows(x, K)`), in chunks of at most `--max-physical-batch-size` samples.
- LR scheduler, EMA and `global_step` advance on logical steps only: `optimizer.step()` runs after
  every chunk, and accelerate's wrapper loses its return value, so read `optimizer.optimizer.took_step`.
- The engine's state (accountant, sampler position, noise seed) is saved beside accelerate's state,
  readable by its owner only, and loaded **before** make_private when resuming (the engine then takes
  the checkpoint's seed and position). The privacy ledger charges any release after a checkpoint.

    python examples/diffusers_accelerate.py --out runs/unet --max-train-steps 40 --multiplicity 4
    python examples/diffusers_accelerate.py --out runs/unet --max-train-steps 40 --resume latest   # after a stop
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import dpfast
from dpfast import PrivacyEngine


def digits(size: int):
    """scikit-learn's bundled digits (a stand-in for the private images), in [-1, 1] at size x size."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images / 16.0 * 2 - 1, dtype=torch.float32).unsqueeze(1)
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return TensorDataset(x)


def build_unet(size: int):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=size, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(16, 32), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def main(argv=None) -> dict:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--resolution", type=int, default=8)
    p.add_argument("--train-batch-size", type=int, default=64, help="expected samples per logical step")
    p.add_argument("--max-physical-batch-size", type=int, default=32, help="samples per forward/backward chunk")
    p.add_argument("--multiplicity", type=int, default=1, help="noise multiplicity K: rows per sample")
    p.add_argument("--max-train-steps", type=int, default=200, help="logical steps (total, across resumes)")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--lr-warmup-steps", type=int, default=10)
    p.add_argument("--noise-multiplier", type=float, default=1.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--checkpointing-steps", type=int, default=20)
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    p.add_argument("--stop-at-step", type=int, default=None, help="save and stop at this step (as if killed there)")
    p.add_argument("--seed", type=int, default=0, help="model init and diffusion noise (public)")
    p.add_argument("--noise-seed", type=int, default=None,
                   help="the engine's seed (DP noise, Poisson batches): leave it out to draw it from the OS; a known "
                        "seed voids the privacy, so pin it only to test")
    p.add_argument("--deterministic-resume", action="store_true",
                   help="resume with the checkpoint's noise key (bit-exact, for tests): sound only if no checkpoint "
                        "is ever continued twice; by default every resume draws a fresh key")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(project_dir=str(out))
    torch.manual_seed(args.seed)
    model = build_unet(args.resolution)
    ema = EMAModel(model.parameters(), decay=0.99)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    loader = DataLoader(digits(args.resolution), batch_size=args.train_batch_size)

    resume = None
    if args.resume:
        found = sorted(out.glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1]))
        resume = (found[-1] if found else None) if args.resume == "latest" else Path(args.resume)
    engine = PrivacyEngine(accountant="prv", seed=args.noise_seed, ledger=out / "privacy_ledger.jsonl",
                           deterministic_resume=args.deterministic_resume)
    if resume is not None:  # before make_private: the engine takes the checkpoint's seed and position
        engine.load_checkpoint(path=resume / "privacy_engine.pt", module=None)
    K = args.multiplicity
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=args.noise_multiplier,
        max_grad_norm=args.max_grad_norm, multiplicity=K, max_physical_batch_size=args.max_physical_batch_size)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    accelerator.register_for_checkpointing(ema)
    global_step = 0
    if resume is not None:
        accelerator.load_state(str(resume))
        global_step = json.loads((resume / "step.json").read_text())["global_step"]
    def save(step):
        d = out / f"checkpoint-{step}"
        accelerator.save_state(str(d))
        engine.save_checkpoint(path=d / "privacy_engine.pt", module=None)  # mode 0600: it holds the noise seed
        (d / "step.json").write_text(json.dumps({"global_step": step}))

    stop = min(args.max_train_steps, args.stop_at_step or args.max_train_steps)
    model.train()
    while global_step < stop:
        for (x,) in loader:
            optimizer.zero_grad()
            if len(x):   # an empty Poisson batch: no forward, and step() still releases its noise
                rows = dpfast.expand_rows(x, K)                      # (len(x) * K, C, H, W), sample-major
                # each sample's K rows of noise and timesteps from its own generator, keyed by the engine's
                # seed, the step and the record's index: one stream in batch order would let a record's
                # presence change every other record's draws (README, "Randomness in the loss")
                gens = engine.record_generators()
                T = noise_scheduler.config.num_train_timesteps
                noise = torch.cat([torch.randn(K, *x.shape[1:], generator=g) for g in gens])
                t = torch.cat([torch.randint(0, T, (K,), generator=g) for g in gens])
                pred = model(noise_scheduler.add_noise(rows, noise, t), t).sample
                loss = ((pred - noise) ** 2).flatten(1).mean(1).mean()   # per-row losses, then their mean
                accelerator.backward(loss)
            optimizer.step()
            if not optimizer.optimizer.took_step:   # an intermediate chunk of a larger logical batch
                continue
            lr_scheduler.step()
            ema.step(model.parameters())
            global_step += 1
            if global_step % args.checkpointing_steps == 0 or global_step == stop:
                save(global_step)
            if global_step >= stop:
                break
    epsilon = engine.get_epsilon(args.delta)
    unet = accelerator.unwrap_model(model)
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    unet.save_pretrained(str(out / "unet"))      # the EMA weights: post-processing of the releases
    ema.restore(unet.parameters())
    print(f"step {global_step}: epsilon {epsilon:.3f} at delta {args.delta:g}; model in {out / 'unet'}")
    return {"global_step": global_step, "epsilon": epsilon, "steps_released": engine.steps}


if __name__ == "__main__":
    main()
